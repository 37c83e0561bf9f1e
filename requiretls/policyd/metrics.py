"""Prometheus metrics of the policy service (prometheus_client), served on a loopback port when configured
(the scheme of all three daemons: docs/monitoring.md).

The request path only bumps plain integers in one-element lists ("cells"), one per label set, shared by every
cached answer with those labels; a custom collector turns them into counters when Prometheus scrapes.  That
keeps the warm path free of prometheus_client's locked increments (measured: ~0.6 µs of ~1.3 µs per query).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from requiretls import metrics as common

#: The Postfix TLS security levels an OK answer can carry (label ``level``); anything else is ``other``.
LEVELS = frozenset({"none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify", "secure",
                    "enforce", "opportunistic"})


def level_of(status: str, data: str) -> str:
    if status != "OK":
        return ""
    word = data.split(" ", 1)[0]
    return word if word in LEVELS else "other"


class _Cells(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        req = CounterMetricFamily("requiretls_policyd_requests",
                                  "socketmap requests by zone, answer status and TLS level answered",
                                  labels=["zone", "answer", "level"])
        for (zone, answer, level), cell in sorted(self.m._requests.items()):
            req.add_metric([zone, answer, level], cell[0])
        yield req
        sts = CounterMetricFamily("requiretls_policyd_mta_sts_fetches",
                                  "MTA-STS policy fetches by result (ok, or the kind of failure)", labels=["result"])
        for result, cell in sorted(self.m._fetches.items()):
            sts.add_metric([result], cell[0])
        yield sts
        cache = GaugeMetricFamily("requiretls_policyd_cache_entries", "ready answers held in the answer cache")
        cache.add_metric([], self.m.cache_size())
        yield cache
        yield CounterMetricFamily("requiretls_policyd_cache_hits", "answers served from the answer cache",
                                  value=self.m._hits[0])
        err = CounterMetricFamily("requiretls_policyd_errors", "bad requests and failed lookups by kind",
                                  labels=["kind"])
        for kind, cell in sorted(self.m._errors.items()):
            err.add_metric([kind], cell[0])
        yield err


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or common.registry("policyd")
        self._requests: dict[tuple[str, str, str], list[int]] = {}
        self._fetches: dict[str, list[int]] = {"ok": [0]}
        #: Set by the service: how many answers its cache holds.
        self.cache_size: Callable[[], int] = lambda: 0
        self._errors: dict[str, list[int]] = {}
        self._hits = [0]
        self._counters: dict[tuple[str, str, str], Callable[[], None]] = {}
        self.registry.register(_Cells(self))
        self._lookup = Histogram(
            "requiretls_policyd_lookup_seconds", "destination lookup latency (DNS, MTA-STS)",
            buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 1, 2, 5, 10, 30), registry=self.registry,
        )

    def _cell(self, zone: str, answer: str, level: str) -> list[int]:
        cell = self._requests.get((zone, answer, level))
        if cell is None:
            cell = self._requests[(zone, answer, level)] = [0]
        return cell

    def request(self, zone: str, answer: str, level: str = "") -> None:
        self._cell(zone, answer, level)[0] += 1

    def sts_fetch(self, result: str) -> None:
        cell = self._fetches.get(result)
        if cell is None:
            cell = self._fetches[result] = [0]
        cell[0] += 1

    def hit_counter(self, zone: str, answer: str, level: str = "") -> Callable[[], None]:
        """What a cached answer calls when it is served: counts the request and the cache hit.  One function
        per label set, shared by every cached answer with those labels (a closure each would cost ~150 bytes
        per cached destination)."""
        count = self._counters.get((zone, answer, level))
        if count is None:
            req, hits = self._cell(zone, answer, level), self._hits

            def count() -> None:
                req[0] += 1
                hits[0] += 1

            self._counters[(zone, answer, level)] = count
        return count

    def error(self, kind: str) -> None:
        cell = self._errors.get(kind)
        if cell is None:
            cell = self._errors[kind] = [0]
        cell[0] += 1

    def lookup_seconds(self, seconds: float) -> None:
        self._lookup.observe(seconds)

    def serve(self, address: str) -> None:
        """Expose /metrics on ``HOST:PORT`` (loopback by default)."""
        common.serve(self.registry, address)


def fetch_result(e: BaseException) -> str:
    """An MTA-STS fetch failure as an RFC 8460 section 4.3 result type."""
    from requiretls.dest.errors import MtaStsPolicyError, MtaStsTlsError

    if isinstance(e, MtaStsTlsError):
        return "sts-webpki-invalid"
    if isinstance(e, MtaStsPolicyError):
        return "sts-policy-invalid"
    return "sts-policy-fetch-error"


def count_sts_fetches(sts: object, metrics: Metrics) -> None:
    """Count every MTA-STS policy fetch of ``sts`` (an :class:`~requiretls.dest.mtasts.StsResolver`) by result."""
    fetch: Callable[[str, str], Awaitable[object]] = getattr(sts, "fetch")  # noqa: B009

    async def counted(domain: str, record_id: str) -> object:
        try:
            policy = await fetch(domain, record_id)
        except Exception as e:
            metrics.sts_fetch(fetch_result(e))
            raise
        metrics.sts_fetch("ok")
        return policy

    setattr(sts, "fetch", counted)  # noqa: B010
