"""Wiring shared by the daemons: settings -> destination resolver (DNS, MTA-STS, cache backend)."""

from __future__ import annotations

from requiretls.config import Settings, split_hostport
from requiretls.dest import DestinationResolver, DestSettings, DnsClient, ResolverSettings, StsResolver, StsSettings
from requiretls.dest.cache import create_cache


def destination_resolver(settings: Settings) -> DestinationResolver:
    host, port = split_hostport(settings.get("dns", "resolver")) if settings.get("dns", "resolver") else (None, None)
    cache = create_cache(
        settings.get("cache", "backend"),
        sqlite_path=settings.get("cache", "sqlite_path"),
        redis_url=settings.get("cache", "redis_url"),
        max_entries=int(settings.get("cache", "max_entries")),
    )
    dns = DnsClient(ResolverSettings(address=host, port=port or 53, timeout=float(settings.get("dns", "timeout"))),
                    cache=cache)
    sts = StsResolver(
        dns,
        StsSettings(cafile=settings.get("mta_sts", "cafile") or None,
                    fetch_timeout=float(settings.get("mta_sts", "fetch_timeout"))),
        cache=cache,
    )
    return DestinationResolver(dns, sts, DestSettings(use_mta_sts=bool(settings.get("mta_sts", "enabled"))))
