"""Wiring shared by the daemons: the [dns], [mta_sts] and [cache] sections -> destination resolver, and the
start-up check that the resolver's AD bit may be trusted."""

from __future__ import annotations

import logging

from requiretls import metrics
from requiretls.config import CacheSettings, DnsSettings, MtaStsSettings
from requiretls.dest import DestinationResolver, DestSettings, DnsClient, ResolverSettings, StsResolver, StsSettings
from requiretls.dest.cache import create_cache
from requiretls.errors import ConfigError
from requiretls.log import kv


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


log = logging.getLogger("requiretls")


async def trust_resolver(resolver: DestinationResolver, dns: DnsSettings, filename: str = "") -> None:
    """RFC 7672 section 2.1.1: DANE and the DNSSEC half of RFC 8689 section 4.2.1 rest on the resolver's AD bit.

    Refuse to run (``dns.untrusted_resolver = refuse``, ConfigError) or warn when that bit cannot be trusted;
    log and go on when the resolver gives no answer now (its lookups defer until it does).
    """
    check = await resolver.dns.check_resolver(ask_remote=dns.resolver is not None, name=dns.resolver_check_name)
    where = f"{check.address}:{check.port}" if check.address else "none"
    if dns.resolver is None and not check.loopback and check.address:
        problem = (f"the first nameserver of /etc/resolv.conf, {check.address}, is not on loopback: its AD bit "
                   "can be forged on the way; run a validating resolver on loopback or name one in dns.resolver")
    elif check.validates is False:
        problem = f"resolver {where} {check.detail}; DANE and DNSSEC-validated MX records cannot be trusted"
    elif check.validates is None:
        log.warning("%s", kv(resolver=where, resolver_check="no answer now, lookups defer until it answers",
                             detail=check.detail))
        return
    else:
        metrics.resolver_validating(True)
        log.info("%s", kv(resolver=where, resolver_check="validating"))
        return
    metrics.resolver_validating(False)
    if dns.untrusted_resolver == "refuse":
        raise ConfigError(filename or "<defaults>", None, "dns.untrusted_resolver",
                          f"refusing to run: {problem} (set untrusted_resolver = \"warn\" to run anyway)")
    log.warning("%s", kv(resolver=where, resolver_check="UNTRUSTED, running anyway (untrusted_resolver = warn)",
                         problem=problem))
