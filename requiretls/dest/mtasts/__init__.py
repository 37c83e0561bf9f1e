"""MTA-STS (RFC 8461): discovery record, policy fetch and parsing, caching, refresh.

Modules: :mod:`.parse` (pure: TXT record and policy body, sections 3.1 and 3.2), :mod:`.fetch` (the HTTPS GET
and the rules of section 3.3), :mod:`.store` (the one policy store, section 5.1), :mod:`.resolver` (the flow
below), :mod:`.settings`.

Flow of :meth:`StsResolver.resolve` (RFC 8461 sections 3 and 5):

1. Look up ``_mta-sts.DOMAIN`` TXT (CNAMEs followed).  Exactly one record that
   starts with ``v=STSv1`` must remain, with a valid ``id`` (section 3.1).
2. A cached, unexpired policy with the same ``id`` is used as it is.  A missing
   or invalid TXT record does not flush the cache (section 3.1, 10.2).
3. Otherwise fetch ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``: SNI and a
   certificate valid for ``mta-sts.DOMAIN``, status 200 only, no redirects, a
   size cap, ``text/plain``, a timeout (section 3.3).
4. When the fetch fails, a cached policy is still applied; with nothing cached
   the domain is treated as having no policy (section 3.3), and the fetch is
   not retried for the same ``id`` for ``retry_after_failure`` seconds.
5. Policies are refreshed proactively before they expire (section 3.3, 10.2).
"""

from __future__ import annotations

from requiretls.facts import StsMode, StsPolicy, StsResult, StsStatus

from ..errors import (
    MtaStsError,
    MtaStsFetchError,
    MtaStsHttpStatusError,
    MtaStsMediaTypeError,
    MtaStsPolicyError,
    MtaStsRecordError,
    MtaStsRedirectError,
    MtaStsTemporaryError,
    MtaStsTimeoutError,
    MtaStsTlsError,
    MtaStsTooLargeError,
)
from .fetch import POLICY_PATH, PolicyFetcher, fetch_policy_text, http11_get, make_tls_context, policy_host
from .parse import MAX_AGE_LIMIT, StsRecord, parse_policy, parse_sts_record, select_sts_record, valid_mx_pattern
from .resolver import StsResolver
from .settings import StsSettings
from .store import PolicyStore

__all__ = [
    "MAX_AGE_LIMIT",
    "POLICY_PATH",
    "MtaStsError",
    "MtaStsFetchError",
    "MtaStsHttpStatusError",
    "MtaStsMediaTypeError",
    "MtaStsPolicyError",
    "MtaStsRecordError",
    "MtaStsRedirectError",
    "MtaStsTemporaryError",
    "MtaStsTimeoutError",
    "MtaStsTlsError",
    "MtaStsTooLargeError",
    "PolicyFetcher",
    "PolicyStore",
    "StsMode",
    "StsPolicy",
    "StsRecord",
    "StsResolver",
    "StsResult",
    "StsSettings",
    "StsStatus",
    "fetch_policy_text",
    "http11_get",
    "make_tls_context",
    "parse_policy",
    "parse_sts_record",
    "policy_host",
    "select_sts_record",
    "valid_mx_pattern",
]
