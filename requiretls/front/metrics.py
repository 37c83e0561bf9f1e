"""The SMTP front's metrics (docs/monitoring.md).  The front runs as several worker processes; each counts its
own sessions (:class:`Counts`, plain integers, nothing shared on the path of a command) and copies them once a
second, and when it stops, into its row of a block of memory shared with the parent (:class:`SharedCounts`,
made before the workers fork).  The parent, which serves ``/metrics`` when ``front.metrics`` is set, adds the
rows up.  A worker that replaces a dead one starts from its row, so the counters never go back; the dead
worker's open sessions are taken off the gauge.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass, fields

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass(slots=True)
class Counts:
    """One worker's counts since the front started (the session gauge ``active`` excepted)."""

    connections: int = 0
    #: Sessions open now.
    active: int = 0
    refused_busy: int = 0
    backend_down: int = 0
    tls: int = 0
    #: Messages smtpd accepted through the front, with and without REQUIRETLS (two counts, so that neither
    #: can seem to go back when a scrape reads a row while a worker writes it).
    requiretls: int = 0
    plain: int = 0
    requiretls_refused: int = 0
    carrier_removed: int = 0
    injection: int = 0


FIELDS = tuple(f.name for f in fields(Counts))


class SharedCounts:
    """One row of :data:`FIELDS` (unsigned 64-bit) per worker slot, in an anonymous shared mapping."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._mem = mmap.mmap(-1, 8 * len(FIELDS) * max(1, slots))
        self._view = memoryview(self._mem).cast("Q")

    def _row(self, slot: int) -> memoryview:
        n = len(FIELDS)
        return self._view[slot * n:(slot + 1) * n]

    def store(self, slot: int, counts: Counts) -> None:
        row = self._row(slot)
        for i, name in enumerate(FIELDS):
            row[i] = max(0, getattr(counts, name))

    def load(self, slot: int) -> Counts:
        """The counts a (re)started worker in ``slot`` goes on from: the row's, no session open."""
        row = self._row(slot)
        counts = Counts(*(int(v) for v in row))
        counts.active = 0
        return counts

    def worker_gone(self, slot: int) -> None:
        """Its sessions ended with it."""
        self._row(slot)[FIELDS.index("active")] = 0

    def totals(self) -> Counts:
        out = Counts()
        for slot in range(self.slots):
            row = self._row(slot)
            for i, name in enumerate(FIELDS):
                setattr(out, name, getattr(out, name) + int(row[i]))
        return out


class FrontCollector(Collector):
    """``requiretls_front_*`` from the shared rows, at each scrape."""

    def __init__(self, shared: SharedCounts) -> None:
        self.shared = shared

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        t = self.shared.totals()
        yield CounterMetricFamily("requiretls_front_connections", "client connections accepted",
                                  value=t.connections)
        yield GaugeMetricFamily("requiretls_front_sessions", "client sessions open now", value=t.active)
        yield CounterMetricFamily("requiretls_front_busy_refusals",
                                  "connections refused with 421 at front.max_connections", value=t.refused_busy)
        yield CounterMetricFamily("requiretls_front_smtpd_unreachable",
                                  "sessions answered 421 because the smtpd behind the front could not be reached",
                                  value=t.backend_down)
        yield CounterMetricFamily("requiretls_front_tls_sessions", "STARTTLS handshakes completed", value=t.tls)
        msgs = CounterMetricFamily("requiretls_front_messages",
                                   "messages smtpd accepted through the front, by whether the client gave REQUIRETLS",
                                   labels=["requiretls"])
        msgs.add_metric(["yes"], t.requiretls)
        msgs.add_metric(["no"], t.plain)
        yield msgs
        yield CounterMetricFamily("requiretls_front_requiretls_refused",
                                  "MAIL FROM ... REQUIRETLS refused (555) because the session had no TLS",
                                  value=t.requiretls_refused)
        yield CounterMetricFamily("requiretls_front_carrier_fields_removed",
                                  "Require-TLS-ESMTP fields a client wrote itself, removed", value=t.carrier_removed)
        yield CounterMetricFamily("requiretls_front_starttls_injections",
                                  "sessions dropped for commands sent behind STARTTLS in clear", value=t.injection)
