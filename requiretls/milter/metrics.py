"""The milter's metrics (docs/monitoring.md): what it decided for each message.

libmilter calls back in one thread per connection; prometheus_client's counters are thread-safe.  Off unless
``milter.metrics`` is set: then :data:`METRICS` is set once at start and :func:`record` counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from requiretls import metrics as common
from requiretls.policy.headers import PRIVATE_HEADERS
from requiretls.policy.model import Decision, MessageClass

#: Why a ``TLS-Required: No`` (or the opt-out cookie) was not honoured, from the decision's notes.
_REFUSALS = (
    ("REQUIRETLS wins", "requiretls"),
    ("opt-out disabled", "disabled"),
    ("optout_from = trusted", "untrusted_client"),
    ("optout=no", "rule"),
)
_FIELDS = frozenset(h.lower() for h in PRIVATE_HEADERS) | {"tls-required", "require-tls-esmtp"}


class MilterMetrics:
    def __init__(self, reg: CollectorRegistry | None = None) -> None:
        self.registry = reg or common.registry("milter")
        self.messages = Counter("requiretls_milter_messages", "messages by the class they were routed as",
                                ["class"], registry=self.registry)
        self.optouts = Counter("requiretls_milter_optouts",
                               "TLS-Required: No opt-outs, honoured or refused, by reason", ["result", "reason"],
                               registry=self.registry)
        self.removed = Counter("requiretls_milter_forged_headers_removed",
                               "private or forged header fields removed or rewritten on the way in", ["field"],
                               registry=self.registry)
        self.rejections = Counter("requiretls_milter_rejections",
                                  "messages refused at end of data (pre-flight 5.7.30, syntax), by enhanced code",
                                  ["dsn"], registry=self.registry)
        self.set_aside = Counter("requiretls_milter_optout_set_aside",
                                 "destinations of opt-out messages whose DANE or MTA-STS policy the opt-out set "
                                 "aside", ["policy"], registry=self.registry)
        for p in ("dane", "mta-sts"):
            self.set_aside.labels(p)
        self.tempfails = Counter("requiretls_milter_tempfails", "messages tempfailed on internal doubt",
                                 registry=self.registry)
        for c in MessageClass:
            self.messages.labels(str(c))
        self.tempfails.inc(0)

    def record(self, d: Decision) -> None:
        if d.reject is not None:
            self.rejections.labels(common.dsn_label(d.reject.dsn)).inc()
            return
        self.messages.labels(str(d.msg_class)).inc()
        if d.msg_class is MessageClass.OPTOUT:
            self.optouts.labels("honoured", "").inc()
        else:
            refusal = next((r for r in d.reasons if ("ignored" in r or "refused" in r)
                            and any(k in r for k in ("opt-out", "TLS-Required", "optout"))), None)
            if refusal is not None:
                self.optouts.labels("refused", next((reason for needle, reason in _REFUSALS if needle in refusal),
                                                    "other")).inc()
        for e in d.header_edits:
            if e.action != "add":
                name = e.name.lower()
                self.removed.labels(name if name in _FIELDS else "other").inc()


METRICS: MilterMetrics | None = None


def record(d: Decision) -> None:
    if METRICS is not None:
        METRICS.record(d)


def set_aside(policy: str) -> None:
    if METRICS is not None:
        METRICS.set_aside.labels(policy).inc()


def tempfail() -> None:
    if METRICS is not None:
        METRICS.tempfails.inc()


def start(address: str) -> MilterMetrics:
    global METRICS
    METRICS = MilterMetrics()
    common.serve(METRICS.registry, address)
    return METRICS
