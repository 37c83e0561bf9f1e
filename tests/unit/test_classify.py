"""The message pipeline (requiretls.policy.classify): MTA, routes, hand-back and pre-flight around the decision."""

from __future__ import annotations

import pytest

from requiretls.policy import (
    DestinationReadiness,
    Envelope,
    LocalPolicy,
    MessageClass,
    MessageFacts,
    PolicyTable,
    PostfixFeatures,
    PreflightMode,
    RcptRoute,
    Readiness,
    Route,
    classify,
    decide,
    remote_routes,
    static_readiness,
)
from requiretls.policy.classify import NOT_ENFORCEABLE
from requiretls.policy.model import HeaderEdit

P37, P311, SENDMAIL = PostfixFeatures((3, 7)), PostfixFeatures((3, 11)), PostfixFeatures((8, 17), postfix=False)
IMPOSSIBLE = DestinationReadiness(Readiness.IMPOSSIBLE, "no MX offers REQUIRETLS")
ROUTES = (RcptRoute("b@d.example", "smtp", None), RcptRoute("u@me.example", "local", "me.example"),
          RcptRoute("r@x.example", "relay", "[relay.example]:587"))


def _facts(params: tuple[str, ...] = ("REQUIRETLS",), headers: tuple[tuple[str, str], ...] = (),
           routes: tuple[RcptRoute, ...] = ROUTES, sender: str = "a@s.example") -> MessageFacts:
    return MessageFacts(Envelope(sender, tuple(r.address for r in routes), params), headers=headers)


class Asked:
    """A readiness callback that records what it was asked."""

    def __init__(self, answers: dict[str, DestinationReadiness]) -> None:
        self.answers, self.calls = answers, []  # type: list[tuple[str, ...]]

    def __call__(self, domains: tuple[str, ...]) -> tuple[tuple[str, DestinationReadiness], ...]:
        self.calls.append(domains)
        return tuple((d, self.answers[d]) for d in domains if d in self.answers)


def test_requiretls_goes_to_the_agent_with_local_and_transport_recipients_handed_back() -> None:
    c = classify(_facts(), LocalPolicy(), P37, ROUTES, relayhost="[relay.example]:587")
    assert c.route is Route.RELAY and c.handback == ("u@me.example",)
    # The relayhost recipient stays with the agent, which sends it to the next hop Postfix chose.
    assert c.decision.header_edits[-3:] == (HeaderEdit("add", "X-RequireTLS-Route", "relay"),
                                           HeaderEdit("add", "X-RequireTLS-Handback", "<u@me.example>"),
                                           HeaderEdit("add", "X-RequireTLS-Nexthop",
                                                      "<b@d.example> mx, <u@me.example> local, "
                                                      "<r@x.example> [relay.example]:587"))
    assert c.decision.envelope_params == ("RET=HDRS",) and c.decision.reject is None


def test_native_requiretls_on_3_11_adds_no_route_and_no_handback() -> None:
    c = classify(_facts(), LocalPolicy(), P311, ROUTES)
    assert c.route is None and c.handback == ()
    assert not [e for e in c.decision.header_edits if e.action == "add"]


def test_sendmail_refuses_requiretls_without_asking_preflight() -> None:
    """Nothing on Sendmail enforces REQUIRETLS on delivery (RFC 8689 §4.2.1): refuse, and do no I/O for it."""
    asked = Asked({"d.example": IMPOSSIBLE})
    c = classify(_facts(), LocalPolicy(preflight=PreflightMode.REJECT), SENDMAIL, ROUTES, readiness=asked)
    assert c.decision.reject == NOT_ENFORCEABLE and c.route is None and asked.calls == []
    assert "not Postfix" in c.decision.reasons[-1]


def test_sendmail_accepts_an_optout_without_route_headers() -> None:
    c = classify(_facts((), (("TLS-Required", "No"),)), LocalPolicy(), SENDMAIL, ROUTES)
    assert c.decision.msg_class is MessageClass.OPTOUT and c.decision.reject is None and c.route is None


def test_preflight_asks_only_outbound_domains_and_only_for_requiretls() -> None:
    asked = Asked({"d.example": IMPOSSIBLE})
    policy = LocalPolicy(preflight=PreflightMode.REJECT)
    c = classify(_facts(), policy, P37, ROUTES, relayhost="[relay.example]:587", readiness=asked)
    # Only the recipient that goes to its own MX: the one routed to the relayhost is judged by the agent at
    # that next hop, the local one has nothing to check.
    assert asked.calls == [("d.example",)] and c.preflight_domains == ("d.example",)
    assert c.decision.reject is not None and c.decision.reject.dsn == "5.7.30"
    assert c.route is Route.RELAY  # the route is still shown, as before
    asked = Asked({})
    classify(_facts(()), policy, P37, ROUTES, readiness=asked)
    assert asked.calls == []  # a default message needs no pre-flight
    classify(_facts(), LocalPolicy(), P37, ROUTES, readiness=asked)
    assert asked.calls == []  # pre-flight off
    classify(_facts(("REQUIRETLS=yes",)), policy, P37, ROUTES, readiness=asked)
    assert asked.calls == []  # already refused (501)


def test_preflight_warn_keeps_the_message_and_says_why() -> None:
    c = classify(_facts(), LocalPolicy(preflight=PreflightMode.WARN), P37, ROUTES,
                 readiness=static_readiness([("d.example", IMPOSSIBLE)]))
    assert c.decision.reject is None
    assert c.decision.reasons[-1] == "pre-flight warning: REQUIRETLS delivery to d.example is not possible: " \
                                     "no MX offers REQUIRETLS"


def test_a_handed_back_recipients_domain_is_not_refused_by_preflight() -> None:
    """Postfix delivers local recipients itself; their domain's readiness is irrelevant (facts.readiness too)."""
    facts = _facts()
    facts = MessageFacts(facts.envelope, facts.session, facts.headers, (("me.example", IMPOSSIBLE),))
    c = classify(facts, LocalPolicy(preflight=PreflightMode.REJECT), P37, ROUTES)
    assert c.decision.reject is None and "me.example" not in c.preflight_domains


def test_optout_with_remote_recipients_only_goes_to_the_relaxed_clone() -> None:
    routes = remote_routes(["b@d.example", "c@e.example"])
    c = classify(_facts((), (("TLS-Required", "No"),), routes), LocalPolicy(), P37, routes)
    assert c.route is Route.RELAXED and c.handback == ()
    assert c.decision.header_edits == (HeaderEdit("add", "X-RequireTLS-Route", "relaxed"),)


def test_optout_no_for_every_recipient_routes_nothing() -> None:
    policy = LocalPolicy(table=PolicyTable.parse("d.example dane optout=no\n", "t"))
    routes = remote_routes(["b@d.example"])
    c = classify(_facts((), (("TLS-Required", "No"),), routes), policy, P37, routes)
    assert c.decision.msg_class is MessageClass.DEFAULT and c.route is None


def test_null_sender_is_exempt_and_gets_no_route() -> None:
    c = classify(_facts(sender=""), LocalPolicy(), P37, ROUTES)
    assert c.decision.msg_class is MessageClass.DEFAULT and c.route is None


def test_classify_agrees_with_decide_on_class_and_recipients() -> None:
    facts = _facts((), (("Subject", "x"), ("TLS-Required", "No")))
    c, d = classify(facts, LocalPolicy(), P37, ROUTES), decide(facts, LocalPolicy())
    assert (c.decision.msg_class, c.decision.recipients, c.decision.envelope_params) == (
        d.msg_class, d.recipients, d.envelope_params)
    assert c.decision.header_edits[: len(d.header_edits)] == d.header_edits


def test_routes_must_match_the_envelope() -> None:
    with pytest.raises(ValueError, match="routes"):
        classify(_facts(), LocalPolicy(), P37, ROUTES[:2])
    with pytest.raises(ValueError, match="routes"):
        classify(_facts(), LocalPolicy(), P37, tuple(reversed(ROUTES)))


def test_json_adds_route_handback_and_preflight_domains() -> None:
    j = classify(_facts(), LocalPolicy(), P37, ROUTES).to_json()
    # r@x.example goes to Postfix's next hop [relay.example]:587 through the agent, not back to Postfix.
    assert (j["route"], j["handback"], j["preflight_domains"]) == ("relay", ["u@me.example"], [])
    assert j["class"] == "requiretls"
