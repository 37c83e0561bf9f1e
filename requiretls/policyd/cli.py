"""``requiretls policyd``: run the socketmap TLS policy service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from requiretls.addresses import ListenAddress
from requiretls.config import Settings, load
from requiretls.daemon import Reloader
from requiretls.log import kv, setup
from requiretls.policyd.metrics import Metrics, count_sts_fetches
from requiretls.policyd.server import PolicyServer, PolicyService, ServiceSettings, serve_forever
from requiretls.runtime import destination_resolver, trust_resolver

log = logging.getLogger("requiretls")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="config file (default: built-in defaults)")
    p.add_argument("--listen", action="append", metavar="SPEC", help="override policyd.listen (repeat)")


def run(args: argparse.Namespace) -> int:
    settings = load(args.config)
    pd = settings.policyd
    setup("policyd", settings.log.target, settings.log.level)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    metrics = Metrics()
    service = PolicyService(
        settings.local_policy.table,
        destination_resolver(settings.dns, settings.mta_sts, settings.cache),
        metrics,
        ServiceSettings(pd.answer_ttl, pd.lookup_timeout, pd.answer_cache_size, pd.idle_timeout,
                        pd.answer_attributes),
    )
    if service.resolver is not None and service.resolver.sts is not None:
        count_sts_fetches(service.resolver.sts, metrics)
    if pd.metrics is not None:
        metrics.serve(str(pd.metrics))

    def apply(fresh: Settings) -> dict[str, object]:
        service.set_table(fresh.local_policy.table)
        return {"table_entries": len(fresh.local_policy.table)}

    resolver = service.resolver

    async def refresh_sts() -> None:
        """RFC 8461 §3.3: refresh cached policies before they expire, so a fetch failure near expiry does not
        leave a domain without its policy."""
        while resolver is not None and resolver.sts is not None:
            await asyncio.sleep(3600)
            try:
                await resolver.sts.refresh_all()
            except Exception as e:  # a failed refresh keeps the cached policies; log and try again later
                log.warning("%s", kv(mta_sts_refresh="failed", error=f"{type(e).__name__}: {e}"))

    async def main() -> None:
        if service.resolver is not None:
            await trust_resolver(service.resolver, settings.dns, settings.filename)
        refresher = asyncio.create_task(refresh_sts())
        try:
            listen = [ListenAddress.parse(a) for a in args.listen] if args.listen else pd.listen
            await serve_forever(PolicyServer(service), [str(a) for a in listen], Reloader(args.config, apply))
        finally:
            refresher.cancel()

    asyncio.run(main())
    return 0
