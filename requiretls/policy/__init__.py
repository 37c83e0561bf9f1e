"""The shared decision core: pure functions, no I/O (architecture: "policy/").

Adapters (milter, policy service, relay agent, ``requiretls explain``) build :class:`MessageFacts`, call
:func:`decide` with the admin's :class:`LocalPolicy`, and act on the :class:`Decision`.
"""

from requiretls.policy.decide import PRIVATE_HEADERS, ROUTE_HEADER, decide
from requiretls.policy.headers import parse_header_block, parse_tls_required
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
    "PRIVATE_HEADERS",
    "ROUTE_HEADER",
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
    "RecipientDecision",
    "Rejection",
    "Route",
    "Session",
    "TableEntry",
    "decide",
    "parse_header_block",
    "parse_tls_required",
    "plan_route",
    "trust",
    "with_route",
]
