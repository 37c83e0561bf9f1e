"""Pre-flight for the milter: can a REQUIRETLS message reach these destinations at all?

libmilter calls the milter from its own threads; the destination lookups are asyncio (``requiretls.dest``),
so they run on one event loop in a background thread, whose caches every message shares.  A lookup that
does not finish in time, or fails, is "unknown": it never refuses a message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterable

from requiretls.dest import DestinationResolver, Prober, VerdictOutcome, assess_requiretls
from requiretls.policy import DestinationReadiness, Readiness


class Preflight:
    def __init__(self, resolver: DestinationResolver, prober: Prober | None = None, timeout: float = 10.0) -> None:
        self.resolver = resolver
        self.prober = prober
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="preflight", daemon=True)
        self.thread.start()

    def readiness(self, domains: Iterable[str]) -> tuple[tuple[str, DestinationReadiness], ...]:
        todo = sorted(set(domains))
        if not todo:
            return ()
        fut = asyncio.run_coroutine_threadsafe(self._all(todo), self.loop)
        try:
            return fut.result(self.timeout)
        except Exception as e:  # pre-flight must never break mail flow (a timeout included)
            fut.cancel()
            why = "timed out" if isinstance(e, concurrent.futures.TimeoutError) else f"{type(e).__name__}"
            return tuple((d, DestinationReadiness(Readiness.UNKNOWN, f"pre-flight {why}")) for d in todo)

    async def _all(self, domains: list[str]) -> tuple[tuple[str, DestinationReadiness], ...]:
        results = await asyncio.gather(*(self._one(d) for d in domains))
        return tuple(zip(domains, results, strict=True))

    async def _one(self, domain: str) -> DestinationReadiness:
        try:
            dest = await self.resolver.lookup(domain)
            probes = await self.prober.probe_destination(dest) if self.prober is not None else None
        except Exception as e:  # unknown, not impossible
            return DestinationReadiness(Readiness.UNKNOWN, f"lookup failed: {type(e).__name__}")
        verdict = assess_requiretls(dest, probes)
        if verdict.outcome is VerdictOutcome.POSSIBLE:
            return DestinationReadiness(Readiness.POSSIBLE, verdict.reason)
        if verdict.outcome is VerdictOutcome.NOT_POSSIBLE:
            return DestinationReadiness(Readiness.IMPOSSIBLE, verdict.reason, verdict.status or "5.7.30")
        return DestinationReadiness(Readiness.UNKNOWN, verdict.reason)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
