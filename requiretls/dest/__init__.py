"""Destination security: what a mail domain offers for TLS.

DNSSEC-aware MX/A/AAAA/TLSA lookups (RFC 7672), DANE matching, MTA-STS
discovery, fetch and cache (RFC 8461), the one SMTP TLS-session routine
(RFC 8689 section 4.2.1 steps 3-5) and cache backends.  It gathers the facts of
:mod:`requiretls.facts`; judging them is :mod:`requiretls.policy`'s job, and
this package never imports it.
"""

from __future__ import annotations

import logging

from requiretls.facts import (
    DaneState,
    Destination,
    DnssecState,
    MxHost,
    MxSource,
    SessionResult,
    SessionStage,
    StsMode,
    StsPolicy,
    StsResult,
    StsStatus,
    TlsRequirement,
)

from .cache import Cache, MemoryCache, RedisCache, SingleFlight, SQLiteCache, create_cache
from .dane import DaneOutcome, DaneResult, TlsaRecord, make_tlsa, match_tlsa, usable_records
from .destination import DestinationResolver, DestSettings
from .dnssec import DnsAnswer, DnsClient, LookupStatus, ResolverSettings
from .errors import (
    BogusDnsError,
    CacheError,
    DestError,
    DnsLookupError,
    MtaStsError,
    MtaStsFetchError,
    MtaStsTemporaryError,
    ProbeError,
    TemporaryDestError,
)
from .mtasts import StsResolver, StsSettings
from .probe import Prober, ProbeSettings
from .session import SessionSettings, TlsSession, open_session

# A library logs; the program that uses it decides where to (no "No handler" fallback to stderr).
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "BogusDnsError",
    "Cache",
    "CacheError",
    "DaneOutcome",
    "DaneResult",
    "DaneState",
    "DestError",
    "DestSettings",
    "Destination",
    "DestinationResolver",
    "DnsAnswer",
    "DnsClient",
    "DnsLookupError",
    "DnssecState",
    "LookupStatus",
    "MemoryCache",
    "MtaStsError",
    "MtaStsFetchError",
    "MtaStsTemporaryError",
    "MxHost",
    "MxSource",
    "ProbeError",
    "ProbeSettings",
    "Prober",
    "RedisCache",
    "ResolverSettings",
    "SQLiteCache",
    "SessionResult",
    "SessionSettings",
    "SessionStage",
    "SingleFlight",
    "StsMode",
    "StsPolicy",
    "StsResolver",
    "StsResult",
    "StsSettings",
    "StsStatus",
    "TemporaryDestError",
    "TlsRequirement",
    "TlsSession",
    "TlsaRecord",
    "create_cache",
    "make_tlsa",
    "match_tlsa",
    "open_session",
    "usable_records",
]
