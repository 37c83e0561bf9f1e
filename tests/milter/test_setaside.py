"""Per message, what an opt-out set aside (issue 18): each recipient domain going to its MX whose DANE or
MTA-STS policy ``TLS-Required: No`` turned off is logged once for the message and counted.  The DNS/MTA-STS
boundary is faked (tests/policyd/fakes); the decision is the real one."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import generate_latest

from requiretls.milter import metrics as milter_metrics
from requiretls.milter.setaside import SetAside, optout_domains
from requiretls.policy import Envelope, LocalPolicy, MessageFacts, Session
from requiretls.policy.decide import decide
from requiretls.policy.route import RcptRoute
from tests.policyd.fakes import FakeResolver, dane, plain, sts

RCPTS = ("a@dane.example", "b@sts.example", "c@plain.example", "d@relayed.example", "e@dane.example",
         "f@broken.example")
ROUTES = (
    RcptRoute("a@dane.example", "smtp", "dane.example"),
    RcptRoute("b@sts.example", "smtp", "sts.example"),
    RcptRoute("c@plain.example", "smtp", "plain.example"),
    RcptRoute("d@relayed.example", "smtp", "[relay.example]:587"),  # the relayhost's policy, not the domain's
    RcptRoute("e@dane.example", "smtp", "dane.example"),  # the same domain again: once
    RcptRoute("f@broken.example", "smtp", "broken.example"),  # a failed lookup says nothing
)
RESOLVER = FakeResolver({"dane.example": dane("dane.example"), "sts.example": sts("sts.example"),
                         "plain.example": plain("plain.example"), "relayed.example": dane("relayed.example"),
                         "broken.example": RuntimeError("SERVFAIL")})


def _decision(headers: tuple[tuple[str, str], ...]):  # type: ignore[no-untyped-def]
    return decide(MessageFacts(Envelope("s@sender.example", RCPTS, ()), Session(sasl_user="s"), headers),
                  LocalPolicy())


def test_only_opt_out_messages_and_mx_routes_are_audited() -> None:
    assert optout_domains(_decision((("TLS-Required", "No"),)), ROUTES) == [
        "dane.example", "sts.example", "plain.example", "broken.example"]
    assert optout_domains(_decision(()), ROUTES) == []  # no opt-out: nothing set aside


def test_the_policies_set_aside_are_logged_per_message_and_counted(caplog: pytest.LogCaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = milter_metrics.MilterMetrics()
    monkeypatch.setattr(milter_metrics, "METRICS", metrics)
    domains = optout_domains(_decision((("TLS-Required", "No"),)), ROUTES)

    async def main() -> list[str]:
        audit = SetAside(RESOLVER, asyncio.get_running_loop())  # type: ignore[arg-type]
        return await audit.audit("4ABC123", domains)

    with caplog.at_level(logging.INFO, "requiretls"):
        found = asyncio.run(main())
    assert found == ["dane.example=dane", "sts.example=mta-sts"]
    (line,) = [r.getMessage() for r in caplog.records if "optout_set_aside" in r.getMessage()]
    assert line.startswith("4ABC123: requiretls: optout_set_aside=") and "dane.example=dane,sts.example=mta-sts" \
        in line
    text = generate_latest(metrics.registry).decode()
    assert 'requiretls_milter_optout_set_aside_total{policy="dane"} 1.0' in text
    assert 'requiretls_milter_optout_set_aside_total{policy="mta-sts"} 1.0' in text
