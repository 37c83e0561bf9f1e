"""Prometheus metrics of the policy service (prometheus_client), served on a loopback port when configured.

Label children are bound once and kept in dictionaries: a request costs one dict lookup and one increment.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._requests = Counter(
            "requiretls_policyd_requests", "socketmap requests by zone and answer", ["zone", "answer"],
            registry=self.registry,
        )
        self._hits = Counter("requiretls_policyd_cache_hits", "answers served from the answer cache",
                             registry=self.registry)
        self._errors = Counter("requiretls_policyd_errors", "bad requests and failed lookups by kind", ["kind"],
                               registry=self.registry)
        self._lookup = Histogram(
            "requiretls_policyd_lookup_seconds", "destination lookup latency (DNS, MTA-STS)",
            buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 1, 2, 5, 10, 30), registry=self.registry,
        )
        self._req_children: dict[tuple[str, str], Counter] = {}
        self._err_children: dict[str, Counter] = {}

    def request(self, zone: str, answer: str) -> None:
        key = (zone, answer)
        child = self._req_children.get(key)
        if child is None:
            child = self._req_children[key] = self._requests.labels(zone, answer)
        child.inc()

    def hit_counter(self, zone: str, answer: str) -> Callable[[], None]:
        """What a cached answer calls when it is served: counts the request and the cache hit."""
        req = self._requests.labels(zone, answer)
        hits = self._hits

        def count() -> None:
            req.inc()
            hits.inc()

        return count

    def error(self, kind: str) -> None:
        child = self._err_children.get(kind)
        if child is None:
            child = self._err_children[kind] = self._errors.labels(kind)
        child.inc()

    def lookup_seconds(self, seconds: float) -> None:
        self._lookup.observe(seconds)

    def serve(self, address: str) -> None:
        """Expose /metrics on ``HOST:PORT`` (loopback by default)."""
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry)
