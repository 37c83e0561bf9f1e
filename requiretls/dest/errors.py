"""Exception classes of :mod:`requiretls.dest`.

Callers branch on the class, never on the message text.  Every error that means
"we cannot know right now" derives from :class:`TemporaryDestError`, so an adapter
can map the whole family to a deferral (RFC 7672 section 2.1.2: doubt delays).
"""

from __future__ import annotations


class DestError(Exception):
    """Base class of every error raised by :mod:`requiretls.dest`."""


class TemporaryDestError(DestError):
    """The answer is unknown for now; the caller must defer, never downgrade."""


class DnsLookupError(TemporaryDestError):
    """A DNS lookup failed: timeout, SERVFAIL, REFUSED, malformed or bogus answer."""


class BogusDnsError(DnsLookupError):
    """The validating resolver reported a DNSSEC validation failure (RFC 4035 section 5.5)."""


class MtaStsError(DestError):
    """Base class of MTA-STS (RFC 8461) problems."""


class MtaStsRecordError(MtaStsError):
    """The ``_mta-sts`` TXT record set is absent, ambiguous or invalid (RFC 8461 section 3.1)."""


class MtaStsPolicyError(MtaStsError):
    """The policy body does not parse as an RFC 8461 section 3.2 policy."""


class MtaStsFetchError(MtaStsError):
    """The HTTPS fetch of the policy failed (RFC 8461 section 3.3)."""


class MtaStsRedirectError(MtaStsFetchError):
    """The policy host answered with a 3xx; RFC 8461 section 3.3 forbids following it."""


class MtaStsHttpStatusError(MtaStsFetchError):
    """The policy host answered with a status other than 200."""


class MtaStsTooLargeError(MtaStsFetchError):
    """The policy body exceeds the size cap (RFC 8461 section 3.3 suggests 64 KiB)."""


class MtaStsMediaTypeError(MtaStsFetchError):
    """The policy was not served as ``text/plain`` (RFC 8461 section 3.2)."""


class MtaStsTlsError(MtaStsFetchError):
    """TLS to ``mta-sts.DOMAIN`` failed, or its certificate did not verify (RFC 8461 section 3.3)."""


class MtaStsTimeoutError(MtaStsFetchError):
    """The policy fetch did not finish within the configured timeout."""


class MtaStsTemporaryError(MtaStsError, TemporaryDestError):
    """No trustworthy answer: a fetch failed and the cache could not be read, so a cached
    policy may exist that we cannot see.  Answering "no policy" would be a downgrade."""


class DaneError(DestError):
    """Base class of DANE (RFC 7672) matching problems."""


class CertificateParseError(DaneError):
    """A peer certificate could not be decoded from DER."""


class CacheError(DestError):
    """A cache backend failed.  Callers degrade to a fresh lookup (never to a weaker answer)."""


class ProbeError(DestError):
    """A REQUIRETLS probe could not complete (connection refused, timeout, protocol error)."""
