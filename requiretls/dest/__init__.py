"""Destination security: what a mail domain offers for TLS.

DNSSEC-aware MX/A/AAAA/TLSA lookups (RFC 7672), DANE matching, MTA-STS
discovery, fetch and cache (RFC 8461), REQUIRETLS probes (RFC 8689), and cache
backends.  Shared by the policy service, the milter's pre-flight and the
delivery agent.  This package never imports :mod:`requiretls.policy`.
"""

from __future__ import annotations

import logging

from .cache import Cache, MemoryCache, RedisCache, SingleFlight, SQLiteCache, create_cache
from .dane import DaneOutcome, DaneResult, TlsaRecord, make_tlsa, match_tlsa, usable_records
from .destination import (
    DaneState,
    Destination,
    DestinationResolver,
    DestSettings,
    MxHost,
    MxSource,
    RequireTlsVerdict,
    TlsRequirement,
    VerdictOutcome,
    assess_requiretls,
)
from .dnssec import DnsAnswer, DnsClient, DnssecState, LookupStatus, ResolverSettings
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
from .mtasts import StsMode, StsPolicy, StsResolver, StsResult, StsSettings, StsStatus
from .probe import Prober, ProbeResult, ProbeSettings

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
    "ProbeResult",
    "ProbeSettings",
    "Prober",
    "RedisCache",
    "RequireTlsVerdict",
    "ResolverSettings",
    "SQLiteCache",
    "SingleFlight",
    "StsMode",
    "StsPolicy",
    "StsResolver",
    "StsResult",
    "StsSettings",
    "StsStatus",
    "TemporaryDestError",
    "TlsRequirement",
    "TlsaRecord",
    "VerdictOutcome",
    "assess_requiretls",
    "create_cache",
    "make_tlsa",
    "match_tlsa",
    "usable_records",
]
