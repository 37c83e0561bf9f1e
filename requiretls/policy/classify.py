"""The one message pipeline: message facts, local policy, MTA features, recipient routes and pre-flight
readiness in; the final decision with its route and edits out.

The milter and ``requiretls explain`` both call :func:`classify`, so they cannot disagree.  The steps:

1. :func:`requiretls.policy.decide.decide_classes`: signals, governance, classes and header edits (RFC 8689
   §2-§4, §5 ``RET=HDRS``);
2. an MTA that is not Postfix (Sendmail) has no route and nothing that enforces REQUIRETLS on delivery, so a
   REQUIRETLS message is refused there rather than sent under a weaker policy (RFC 8689 §4.2.1);
3. the hand-back list: recipients Postfix delivers itself (FILTER routes the whole message);
4. pre-flight: only when the message is REQUIRETLS, not refused, and ``policy.preflight`` is on, the
   adapter's ``readiness`` callback is asked about the domains that leave through the REQUIRETLS path (that
   callback is the adapter's I/O; this module does none);
5. the route header value for this MTA and version, and the edits that carry it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from requiretls.policy.decide import decide_classes, preflight_rejection
from requiretls.policy.local import LocalPolicy
from requiretls.policy.model import (
    Decision,
    DestinationReadiness,
    MessageClass,
    MessageFacts,
    PreflightMode,
    Rejection,
)
from requiretls.policy.route import (
    AGENT_ROUTES,
    Leg,
    PostfixFeatures,
    RcptPlan,
    RcptRoute,
    Route,
    plan_recipients,
    plan_route,
    route_edits,
    split_plans,
)
from requiretls.policy.table import split_address

#: The adapter's pre-flight: recipient domains (lower case, sorted) in, ``(domain, readiness)`` pairs out.
ReadinessSource = Callable[[tuple[str, ...]], Iterable[tuple[str, DestinationReadiness]]]

#: The reply when the MTA cannot enforce REQUIRETLS on delivery (RFC 8689 §5 status 5.7.30).
NOT_ENFORCEABLE = Rejection(
    550, "5.7.30", "REQUIRETLS cannot be enforced by this MTA; send through a REQUIRETLS-capable relay"
)


@dataclass(frozen=True, slots=True)
class Classification:
    """The pipeline's answer.  ``decision`` holds the final class, reasons, every header edit (route header
    included), the MAIL FROM parameters and the rejection; ``route`` is the route header value (None: Postfix
    delivers as usual); ``handback`` the recipients listed for the agent to give back; ``preflight_domains``
    the domains the readiness callback was asked about (empty when it was not called)."""

    decision: Decision
    route: Route | None
    handback: tuple[str, ...]
    preflight_domains: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        """The ``requiretls explain --json`` shape: :meth:`Decision.to_json` plus the route."""
        out = self.decision.to_json()
        out["route"] = None if self.route is None else str(self.route)
        out["handback"] = list(self.handback)
        out["preflight_domains"] = list(self.preflight_domains)
        return out


def static_readiness(known: Iterable[tuple[str, DestinationReadiness]]) -> ReadinessSource:
    """A readiness callback that answers from a fixed list (``explain --impossible``, tests)."""
    table = {d.lower(): r for d, r in known}

    def answer(domains: tuple[str, ...]) -> tuple[tuple[str, DestinationReadiness], ...]:
        return tuple((d, table[d]) for d in domains if d in table)

    return answer


def remote_routes(recipients: Iterable[str]) -> tuple[RcptRoute, ...]:
    """Routes for recipients that Postfix would send over SMTP to their own domain's MX."""
    return tuple(RcptRoute(r, "smtp", None) for r in recipients)


def _outbound_domains(plans: Sequence[RcptPlan]) -> tuple[str, ...]:
    """Domains of the recipients that go to their own MX: those are what pre-flight can judge (hand-back ones
    have nothing to check; a next hop of Postfix's choosing is judged by the agent)."""
    return tuple(sorted({d for p in plans if p.leg is Leg.MX and (d := split_address(p.address)[1])}))


def classify(
    facts: MessageFacts,
    policy: LocalPolicy,
    mta: PostfixFeatures,
    routes: Sequence[RcptRoute],
    relayhost: str = "",
    readiness: ReadinessSource | None = None,
    local_transports: frozenset[str] = frozenset(),
) -> Classification:
    """Run the whole pipeline for one message (see the module docstring for the steps).

    ``routes`` has one entry per envelope recipient, in order (what the MTA's resolver said: the milter's
    ``{rcpt_mailer}``/``{rcpt_host}``).  ``readiness`` defaults to answering from ``facts.readiness``.
    """
    rcpts = facts.envelope.recipients
    if [r.address for r in routes] != list(rcpts):
        raise ValueError("routes must name the envelope recipients, in order")
    d = decide_classes(facts, policy)
    reject, reasons = d.reject, d.reasons
    route = plan_route(d, routes, mta, d.native_requiretls)
    # Worked out only when someone reads it: most messages have no route and no pre-flight.
    back: tuple[str, ...] = ()
    hops: tuple[tuple[str, str], ...] = ()
    plans: tuple[RcptPlan, ...] | None = None  # worked out once, only for the agent's routes or pre-flight
    if route in AGENT_ROUTES:
        plans = plan_recipients(routes, relayhost, local_transports)
        back, hops = split_plans(plans, optout=route is Route.RELAY_OPTOUT)
    asked: tuple[str, ...] = ()
    if d.msg_class is MessageClass.REQUIRETLS and reject is None:
        if not mta.postfix:
            reject = NOT_ENFORCEABLE
            reasons = (*reasons, "refused: this MTA is not Postfix and nothing here enforces REQUIRETLS on delivery "
                                 "(RFC 8689 §4.2.1)")
        elif policy.preflight is not PreflightMode.OFF:
            if plans is None:
                plans = plan_recipients(routes, relayhost, local_transports)
            asked = _outbound_domains(plans)
            if asked:
                source = readiness if readiness is not None else static_readiness(facts.readiness)
                wanted = set(asked)
                answers = {dom: r for dom, r in source(asked) if dom in wanted}
                reject, notes = preflight_rejection(rcpts, policy, answers)
                reasons = (*reasons, *notes)
    if route is not None or reject is not d.reject or reasons is not d.reasons:
        edits = d.header_edits + route_edits(route, back, hops)
        d = Decision(d.msg_class, d.recipients, edits, reject, reasons, d.envelope_params, d.native_requiretls)
    return Classification(d, route, back, asked)
