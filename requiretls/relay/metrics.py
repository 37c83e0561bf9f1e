"""The delivery agent's metrics (docs/monitoring.md): one count per recipient outcome, as Postfix gets it.

Off unless ``relay.metrics`` is set: then :data:`METRICS` is set once at start and :func:`outcome` counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from requiretls import metrics as common
from requiretls.policy.route import Route
from requiretls.relay.deliver import DeliveryStatus, Outcome

_ROUTES = frozenset(str(r) for r in Route)
_TLS = frozenset({"TLSv1.2", "TLSv1.3", "TLSv1.1", "TLSv1", "TLS"})


def _reason(o: Outcome) -> str:
    """A deferral's coarse reason, from its enhanced code (RFC 3463)."""
    dsn = o.dsn
    if dsn.startswith("4.7."):
        return "tls"  # no REQUIRETLS, no authenticated TLS, certificate or TLSA trouble
    if dsn == "4.4.3":
        return "dns"
    if dsn.startswith("4.4."):
        return "network"
    if dsn.startswith("4.3."):
        return "internal"
    return "remote"


class AgentMetrics:
    def __init__(self, reg: CollectorRegistry | None = None) -> None:
        self.registry = reg or common.registry("relay")
        self.deliveries = Counter("requiretls_relay_deliveries",
                                  "recipient outcomes (sent, deferred, bounced) by route and enhanced status code",
                                  ["status", "route", "dsn"], registry=self.registry)
        self.deferrals = Counter("requiretls_relay_deferrals", "deferred recipients by coarse reason",
                                 ["reason"], registry=self.registry)
        self.sessions = Counter("requiretls_relay_tls_deliveries",
                                "recipients sent, by TLS version and how the server was authenticated",
                                ["tls_version", "verify"], registry=self.registry)
        for s in DeliveryStatus:
            self.deliveries.labels(str(s), "relay", "2.0.0" if s is DeliveryStatus.SENT else "other")
        for dsn in ("5.7.30", "5.7.10"):
            self.deliveries.labels("bounced", "relay", dsn)
        for reason in ("tls", "dns", "network", "internal", "remote"):
            self.deferrals.labels(reason)

    def outcome(self, route: str, o: Outcome) -> None:
        self.deliveries.labels(str(o.status), route if route in _ROUTES else "other",
                               common.dsn_label(o.dsn)).inc()
        if o.status is DeliveryStatus.DEFERRED:
            self.deferrals.labels(_reason(o)).inc()
        elif o.status is DeliveryStatus.SENT:
            verify = o.verify if o.verify in ("dane", "pkix") else "none"
            self.sessions.labels(o.tls if o.tls in _TLS else "none", verify).inc()


METRICS: AgentMetrics | None = None


def outcome(route: str, o: Outcome) -> None:
    if METRICS is not None:
        METRICS.outcome(route, o)


def start(address: str) -> AgentMetrics:
    global METRICS
    METRICS = AgentMetrics()
    common.serve(METRICS.registry, address)
    return METRICS
