"""Pre-flight for the milter: can a REQUIRETLS message reach these destinations at all?

libmilter calls the milter from its own threads; the destination lookups are asyncio (``requiretls.dest``),
so they run on one event loop in a background thread, whose caches every message shares.  A lookup that
does not finish in time, or fails, is "unknown": it never refuses a message.  The verdict is
:func:`requiretls.policy.eligibility.judge`, the one the delivery agent acts on: what it would bounce is
"impossible", what it would defer is "unknown".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from requiretls.dest import DestinationResolver, Prober
from requiretls.policy import DestinationReadiness, Readiness
from requiretls.policy.eligibility import Outcome, Verdict, candidates, judge

T = TypeVar("T")


class Preflight:
    def __init__(self, resolver: DestinationResolver, prober: Prober | None = None, timeout: float = 10.0) -> None:
        self.resolver = resolver
        self.prober = prober
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="preflight", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the pre-flight's loop (where its resolver lives) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

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
            probes = None if self.prober is None else await self.prober.probe_hosts(dest, candidates(dest))
        except Exception as e:  # unknown, not impossible
            return DestinationReadiness(Readiness.UNKNOWN, f"lookup failed: {type(e).__name__}")
        return readiness(judge(dest, probes))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


#: What the agent would do -> what pre-flight may conclude at submission.
READINESS = {Outcome.DELIVER: Readiness.POSSIBLE, Outcome.BOUNCE: Readiness.IMPOSSIBLE,
             Outcome.DEFER: Readiness.UNKNOWN}


def readiness(verdict: Verdict) -> DestinationReadiness:
    """A bounce verdict refuses at submission with its own status code; a deferral never refuses."""
    found = READINESS[verdict.outcome]
    return DestinationReadiness(found, verdict.reason, verdict.dsn if found is Readiness.IMPOSSIBLE else "5.7.30")
