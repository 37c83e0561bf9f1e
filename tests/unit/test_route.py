"""Route planning per MTA and Postfix version (architecture: "How each Postfix version is driven")."""

from __future__ import annotations

import pytest

from requiretls.policy import Envelope, LocalPolicy, MessageFacts, PostfixFeatures, RcptRoute, Route, decide
from requiretls.policy.route import handback, nexthops, plan_route


@pytest.mark.parametrize(
    ("macro", "version", "postfix"),
    [("Postfix 3.11.7", (3, 11), True), ("3.10.13", (3, 10), True), ("8.17.1.9", (8, 17), False),
     ("", (3, 7), True), (None, (3, 7), True)],
)
def test_mta_detection_from_the_v_macro(macro: str | None, version: tuple[int, int], postfix: bool) -> None:
    f = PostfixFeatures.from_macro(macro)
    assert (f.version, f.postfix) == (version, postfix)


def _decision(params: tuple[str, ...] = (), headers: tuple[tuple[str, str], ...] = ()) -> object:
    return decide(MessageFacts(Envelope("a@s.example", ("b@d.example",), params), headers=headers), LocalPolicy())


REMOTE = [RcptRoute("b@d.example", "smtp", "d.example")]
LOCAL = [RcptRoute("b@d.example", "smtp", "d.example"), RcptRoute("u@me.example", "local", "me.example")]


@pytest.mark.parametrize(
    ("version", "params", "expected"),
    [("3.7", ("REQUIRETLS",), Route.RELAY), ("3.10", ("REQUIRETLS",), Route.RELAY),
     ("3.11", ("REQUIRETLS",), Route.STRICT), ("3.11", (), Route.REINJECT)],
)
def test_requiretls_route_by_version(version: str, params: tuple[str, ...], expected: Route | None) -> None:
    headers = () if params else (("Require-TLS-ESMTP", "no"), ("Subject", "x"))
    d = decide(MessageFacts(Envelope("a@s.example", ("b@d.example",), params), headers=headers),
               LocalPolicy(table=__import__("requiretls.policy", fromlist=["PolicyTable"]).PolicyTable.parse(
                   "d.example requiretls=yes\n", "t")))
    assert plan_route(d, REMOTE, PostfixFeatures.from_macro(version), d.native_requiretls) == expected


def test_native_requiretls_goes_to_the_strict_clone_only_when_every_recipient_goes_to_its_mx() -> None:
    """3.11: FILTER covers every recipient, so a local or relayhost recipient leaves the message to Postfix."""
    d = decide(MessageFacts(Envelope("a@s.example", ("b@d.example", "u@me.example"), ("REQUIRETLS",))),
               LocalPolicy())
    p311 = PostfixFeatures.from_macro("3.11")
    assert plan_route(d, LOCAL, p311, True) is None
    assert plan_route(d, [RcptRoute("b@d.example", "smtp", "[relay.example]:587")], p311, True) is None
    assert plan_route(d, [RcptRoute("b@d.example", "smtp", "d.example")], p311, True) is Route.STRICT


def test_optout_goes_to_the_relaxed_clone_only_when_every_recipient_goes_to_its_mx() -> None:
    d = _decision(headers=(("TLS-Required", "No"),))
    assert plan_route(d, REMOTE, PostfixFeatures(), False) == Route.RELAXED  # type: ignore[arg-type]
    assert plan_route(d, LOCAL, PostfixFeatures(), False) == Route.RELAY_OPTOUT  # type: ignore[arg-type]
    relayed = [RcptRoute("b@d.example", "smtp", "[relay.example]:587")]
    assert plan_route(d, relayed, PostfixFeatures(), False) == Route.RELAY_OPTOUT  # type: ignore[arg-type]


def test_handback_lists_only_recipients_delivered_on_this_host() -> None:
    """Issue "REQUIRETLS on every path": a transport_maps next hop (smtp:[internal.example]) and the relayhost
    stay with the agent, which sends REQUIRETLS there; handing them back let Postfix send them without it."""
    rcpts = [*LOCAL, RcptRoute("c@t.example", "smtp", "[internal.example]"),
             RcptRoute("e@x.example", "relay", "[relay.example]:587")]
    assert handback(rcpts, "[relay.example]:587") == ("u@me.example",)
    # the local(8) recipient is marked for the guarded hand-back (its forwarded copies keep REQUIRETLS)
    # b@d.example goes to its MX: listed so that the agent knows it was planned (not a later virtual alias)
    assert nexthops(rcpts, "[relay.example]:587") == (("b@d.example", "mx"), ("u@me.example", "local"),
                                                      ("c@t.example", "[internal.example]"),
                                                      ("e@x.example", "[relay.example]:587"))
    assert ("u@me.example", "local") not in nexthops(rcpts, "[relay.example]:587", optout=True)
