"""The shared decision core: pure functions, no I/O (architecture: "policy/").

Adapters (milter, ``requiretls explain``) build :class:`MessageFacts` and the recipients' :class:`RcptRoute`,
call :func:`classify` with the admin's :class:`LocalPolicy` and the :class:`PostfixFeatures`, and act on the
:class:`Classification`; :func:`decide` is the class-and-edits part alone (no MTA, no routes).
"""

from requiretls.policy.classify import (
    Classification,
    ReadinessSource,
    classify,
    remote_routes,
    static_readiness,
)
from requiretls.policy.decide import decide
from requiretls.policy.headers import (
    HANDBACK_HEADER,
    PRIVATE_HEADERS,
    ROUTE_HEADER,
    format_handback,
    parse_handback,
    parse_header_block,
    parse_tls_required,
    route_value,
)
from requiretls.policy.local import LocalPolicy, trust
from requiretls.policy.model import (
    Decision,
    DestinationReadiness,
    Envelope,
    HeaderEdit,
    MessageClass,
    MessageFacts,
    OptoutFrom,
    PreflightMode,
    Readiness,
    RecipientDecision,
    Rejection,
    Session,
)
from requiretls.policy.route import PostfixFeatures, RcptRoute, Route, plan_route, with_route
from requiretls.policy.table import PolicyTable, TableEntry

__all__ = [
    "HANDBACK_HEADER",
    "PRIVATE_HEADERS",
    "ROUTE_HEADER",
    "Classification",
    "Decision",
    "DestinationReadiness",
    "Envelope",
    "HeaderEdit",
    "LocalPolicy",
    "MessageClass",
    "MessageFacts",
    "OptoutFrom",
    "PolicyTable",
    "PostfixFeatures",
    "PreflightMode",
    "RcptRoute",
    "Readiness",
    "ReadinessSource",
    "RecipientDecision",
    "Rejection",
    "Route",
    "Session",
    "TableEntry",
    "classify",
    "decide",
    "format_handback",
    "parse_handback",
    "parse_header_block",
    "parse_tls_required",
    "plan_route",
    "remote_routes",
    "route_value",
    "static_readiness",
    "trust",
    "with_route",
]
