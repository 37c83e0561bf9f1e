"""REQUIRETLS on every path: the per-recipient plan (policy.route.plan_recipient) never hands a recipient that
Postfix would send over the network back to Postfix (Postfix < 3.11 would send it without REQUIRETLS)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from requiretls.policy import RcptRoute
from requiretls.policy.route import LOCAL_GUARD, LOCAL_MAILERS, Leg, RcptPlan, handback, nexthops, plan_recipient

CASES: list[tuple[RcptRoute, str, frozenset[str], RcptPlan]] = [
    (RcptRoute("b@dane.test", "smtp", "dane.test"), "", frozenset(), RcptPlan("b@dane.test", Leg.MX)),
    (RcptRoute("b@dane.test", "smtp", None), "", frozenset(), RcptPlan("b@dane.test", Leg.MX)),
    (RcptRoute("b@dane.test", "relay", "dane.test"), "", frozenset(), RcptPlan("b@dane.test", Leg.MX)),
    # relayhost (bracketed or not), sender-dependent relayhost, transport_maps smtp:/relay: next hops
    (RcptRoute("b@dane.test", "smtp", "[relay.example]:587"), "", frozenset(),
     RcptPlan("b@dane.test", Leg.NEXTHOP, "[relay.example]:587")),
    (RcptRoute("b@dane.test", "smtp", "relay.example"), "", frozenset(),
     RcptPlan("b@dane.test", Leg.NEXTHOP, "relay.example")),
    (RcptRoute("b@dane.test", "relay", "[mx.dane.test]"), "", frozenset(),
     RcptPlan("b@dane.test", Leg.NEXTHOP, "[mx.dane.test]")),
    (RcptRoute("b@dane.test", "smtp", "[mx.dane.test]:25"), "", frozenset(),
     RcptPlan("b@dane.test", Leg.NEXTHOP, "[mx.dane.test]")),
    # delivered here
    (RcptRoute("u@me.test", "local", "me.test"), "", frozenset(), RcptPlan("u@me.test", Leg.HANDBACK, "local")),
    (RcptRoute("u@me.test", "virtual", "me.test"), "", frozenset(), RcptPlan("u@me.test", Leg.HANDBACK)),
    (RcptRoute("u@t7.test", "discard", "t7.test"), "", frozenset(), RcptPlan("u@t7.test", Leg.HANDBACK)),
    (RcptRoute("u@v.test", "error", "5.1.1 User unknown"), "", frozenset(), RcptPlan("u@v.test", Leg.HANDBACK)),
    (RcptRoute("u@me.test", "lmtp", "unix:private/dovecot-lmtp"), "", frozenset({"lmtp:unix:private/dovecot-lmtp"}),
     RcptPlan("u@me.test", Leg.HANDBACK)),
    (RcptRoute("u@me.test", "dovecot", "me.test"), "", frozenset({"dovecot"}), RcptPlan("u@me.test", Leg.HANDBACK)),
    # elsewhere, and nothing here carries REQUIRETLS on: refused
    (RcptRoute("u@me.test", "lmtp", "inet:192.0.2.5:24"), "", frozenset({"lmtp:unix:private/dovecot-lmtp"}),
     RcptPlan("u@me.test", Leg.REFUSE, "refuse:lmtp")),
    (RcptRoute("u@me.test", "mailman", "me.test"), "", frozenset(),
     RcptPlan("u@me.test", Leg.REFUSE, "refuse:mailman")),
    # Postfix 3.5+ next-hop lists are tried in order; garbage in one of them refuses the recipient
    (RcptRoute("b@dane.test", "smtp", "[a.example], [b.example]:587"), "", frozenset(),
     RcptPlan("b@dane.test", Leg.NEXTHOP, "[a.example]|[b.example]:587")),
    (RcptRoute("b@dane.test", "smtp", "[a.example], [b.example"), "", frozenset(),
     RcptPlan("b@dane.test", Leg.REFUSE, "refuse:smtp")),
    # no route macros (sendmail, pickup): the relayhost, else the MX; never a hand-back
    (RcptRoute("b@dane.test", None, None), "[relay.example]", frozenset(),
     RcptPlan("b@dane.test", Leg.NEXTHOP, "[relay.example]")),
    (RcptRoute("b@dane.test", None, None), "", frozenset(), RcptPlan("b@dane.test", Leg.MX)),
]


def test_plan_of_each_routing_feature() -> None:
    for route, relayhost, local, want in CASES:
        got = plan_recipient(route, relayhost, local)
        assert (got.address, got.leg, got.value) == (want.address, want.leg, want.value), (route, got)
        assert got.reason


MAILERS = st.sampled_from(["smtp", "relay", "lmtp", "local", "virtual", "discard", "error", "pipe", "mailman",
                           "SMTP", "uucp", ""])
HOSTS = st.one_of(st.none(), st.sampled_from(["dane.test", "[relay.example]:587", "relay.example",
                                              "unix:private/x", "inet:127.0.0.1:24", "[a], [b]", ""]),
                  st.text(max_size=30))


@given(st.lists(st.tuples(MAILERS, HOSTS), min_size=1, max_size=6), st.sampled_from(["", "[relay.example]:587"]),
       st.frozensets(st.sampled_from(["lmtp:unix:private/x", "pipe", "lmtp"]), max_size=2), st.booleans())
def test_no_combination_hands_back_a_recipient_postfix_would_send_over_the_network(
        routes: list[tuple[str, str | None]], relayhost: str, local: frozenset[str], optout: bool) -> None:
    rcpts = [RcptRoute(f"r{i}@d{i}.test", m or None, h) for i, (m, h) in enumerate(routes)]
    back = set(handback(rcpts, relayhost, local, optout))
    hops = dict(nexthops(rcpts, relayhost, local, optout))
    for r in rcpts:
        mailer = (r.mailer or "").lower()
        declared = mailer in local or f"{mailer}:{(r.host or '').strip()}" in local
        here = mailer in LOCAL_MAILERS or declared
        if not optout:
            # REQUIRETLS: handed back only when Postfix delivers it on this host
            assert (r.address in back) == here, r
        elif r.address in back:
            # an opt-out goes back to Postfix's normal policy, never weaker: only what the agent cannot send
            assert here or plan_recipient(r, relayhost, local).leg is Leg.REFUSE, r
        if not mailer:
            assert r.address not in back, r  # no route macros: the agent decides, never Postfix's own smtp
        if r.address in back and r.address in hops:
            # only the local(8) guard: the agent hands it back through the clone whose forwarded copies keep
            # REQUIRETLS (RFC 8689 section 4.1)
            assert hops[r.address] == LOCAL_GUARD and mailer == "local" and not optout, (r, hops[r.address])
        if not optout and mailer == "local":
            assert hops.get(r.address) == LOCAL_GUARD, r
