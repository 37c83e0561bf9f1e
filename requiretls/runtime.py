"""Wiring shared by the daemons: the [dns], [mta_sts] and [cache] sections -> destination resolver."""

from __future__ import annotations

from requiretls.config import CacheSettings, DnsSettings, MtaStsSettings
from requiretls.dest import DestinationResolver, DestSettings, DnsClient, ResolverSettings, StsResolver, StsSettings
from requiretls.dest.cache import create_cache


def destination_resolver(dns: DnsSettings, mta_sts: MtaStsSettings, cache: CacheSettings) -> DestinationResolver:
    store = create_cache(cache.backend, sqlite_path=cache.sqlite_path, redis_url=cache.redis_url,
                         max_entries=cache.max_entries)
    resolver = dns.resolver
    client = DnsClient(ResolverSettings(address=resolver.host if resolver else None,
                                        port=resolver.port if resolver else 53, timeout=dns.timeout),
                       cache=store)
    sts = StsResolver(client, StsSettings(cafile=mta_sts.cafile, fetch_timeout=mta_sts.fetch_timeout,
                                         retry_after_failure=mta_sts.retry_after_failure), cache=store)
    return DestinationResolver(client, sts, DestSettings(use_mta_sts=mta_sts.enabled))
