"""The milter adapter driven by pymilter's test context (no MTA): facts in, edits out.

The real proof is the e2e suite on Postfix; this pins the adapter's plumbing (macros, edits, chgfrom, reply).
"""

from __future__ import annotations

import io

import Milter
import pytest
from Milter.testctx import TestCtx

from requiretls.milter.app import RequireTLSMilter
from requiretls.policy import LocalPolicy, OptoutFrom, PolicyTable

TestCtx.__test__ = False  # not a pytest class


@pytest.fixture
def ctx() -> TestCtx:
    RequireTLSMilter.policy_source = staticmethod(lambda: LocalPolicy(optout_from=OptoutFrom.TRUSTED))
    RequireTLSMilter.postfix_override = None
    Milter.factory = RequireTLSMilter
    c = TestCtx()
    # pymilter's test context does not understand NOREPLY: offer a protocol without the no-reply bits.
    nr = 0
    for flag in ("P_NR_CONN", "P_NR_HELO", "P_NR_MAIL", "P_NR_RCPT", "P_NR_DATA", "P_NR_UNKN", "P_NR_EOH",
                 "P_NR_BODY", "P_NR_HDR"):
        nr |= getattr(Milter, flag)
    c._opts = TestCtx.default_opts = [Milter.CURR_ACTS, 0x1FFFFF & ~nr, 0, 0]
    # Record the edits as the MTA receives them (the test context's own header model is approximate).
    c.edits = []
    add, chg = c.addheader, c.chgheader
    c.addheader = lambda f, v, i=-1: (c.edits.append(("add", f, v)), add(f, v, i))[1]
    c.chgheader = lambda f, i, v: (c.edits.append(("chg", f, i, v)), chg(f, i, v))[1]
    c._setsymval("v", "Postfix 3.7.11")
    c._setsymval("i", "4ABC123")
    c._setsymval("{rcpt_mailer}", "smtp")
    return c


def _feed(c: TestCtx, msg: bytes, sender: str = "alice@corp.example", *rcpts: str, ip: str = "127.0.0.1") -> int:
    assert c._connect(ip=ip) == Milter.CONTINUE
    return int(c._feedFile(io.BytesIO(msg), sender, *(rcpts or ("bob@friend.example",))))


def test_trusted_optout_cookie_rewrites_subject_adds_header_and_route(ctx: TestCtx) -> None:
    rc = _feed(ctx, b"From: a@corp.example\nSubject: [tls-optout] status\n\nbody\n")
    assert rc == Milter.ACCEPT
    assert ctx.edits == [
        ("chg", "Subject", 1, "status"),
        ("add", "TLS-Required", "No"),
        ("add", "X-RequireTLS-Route", "relaxed"),
    ]


def test_untrusted_client_cookie_changes_nothing(ctx: TestCtx) -> None:
    rc = _feed(ctx, b"From: a@corp.example\nSubject: [tls-optout] status\n\nbody\n", ip="192.0.2.9")
    assert rc == Milter.ACCEPT
    assert ctx.edits == []


def test_forged_route_header_is_deleted(ctx: TestCtx) -> None:
    _feed(ctx, b"From: a@x.example\nX-RequireTLS-Route: relay\nSubject: hi\n\nbody\n", ip="192.0.2.9")
    assert ctx.edits == [("chg", "X-RequireTLS-Route", 1, "")]


def test_requiretls_rule_sets_ret_hdrs_and_routes_to_relay(ctx: TestCtx) -> None:
    table = PolicyTable.parse("friend.example secure requiretls=yes\n", "t")
    RequireTLSMilter.policy_source = staticmethod(lambda: LocalPolicy(table=table))
    _feed(ctx, b"From: a@corp.example\nSubject: hi\n\nbody\n")
    assert ctx._envfromchanged and ctx._sender == "<alice@corp.example>"
    assert ctx._msg["X-RequireTLS-Route"] == "relay"


def test_optout_with_a_local_recipient_goes_to_the_agent(ctx: TestCtx) -> None:
    """FILTER would send a local recipient over SMTP to its own domain; the agent hands it back instead."""
    ctx._setsymval("{rcpt_mailer}", "local")
    _feed(ctx, b"From: a@corp.example\nTLS-Required: No\nSubject: hi\n\nbody\n")
    assert ctx.edits == [("add", "X-RequireTLS-Route", "relay-optout"),
                         ("add", "X-RequireTLS-Handback", "<bob@friend.example>")]


def test_native_requiretls_on_postfix_3_11_goes_to_the_strict_clone(ctx: TestCtx) -> None:
    """Postfix 3.11 enforces it; the strict clone gives it the TLS level RFC 8689 allows for each MX."""
    ctx._setsymval("v", "Postfix 3.11.7")
    assert ctx._connect(ip="127.0.0.1") == Milter.CONTINUE
    ctx._envfrom("<alice@corp.example>", "REQUIRETLS")
    ctx._envrcpt("<bob@friend.example>")
    ctx._msg = __import__("email").message_from_bytes(b"Subject: hi\n\nbody\n")
    ctx._priv.header("Subject", "hi")
    assert ctx._eom() == Milter.ACCEPT
    assert ctx._msg["X-RequireTLS-Route"] == "strict"
    assert ctx._msg["X-RequireTLS-Handback"] is None
    assert ctx._envfromchanged  # RET=HDRS all the same (RFC 8689 §5)


def test_requiretls_with_value_is_rejected_501(ctx: TestCtx) -> None:
    assert ctx._connect(ip="127.0.0.1") == Milter.CONTINUE
    ctx._envfrom("<alice@corp.example>", "REQUIRETLS=yes")
    ctx._envrcpt("<bob@friend.example>")
    ctx._msg = __import__("email").message_from_bytes(b"Subject: hi\n\nbody\n")
    assert ctx._eom() == Milter.REJECT
    assert ctx._reply[:2] == ("501", "5.5.4")


def test_sendmail_gets_no_route_headers_and_requiretls_is_refused(ctx: TestCtx) -> None:
    """Sendmail's ``v`` macro is its bare version: no FILTER exists there and nothing enforces REQUIRETLS."""
    ctx._setsymval("v", "8.17.1.9")
    rc = _feed(ctx, b"From: a@corp.example\nSubject: [tls-optout] status\nX-RequireTLS-Route: relay\n\nbody\n")
    assert rc == Milter.ACCEPT
    assert ("chg", "X-RequireTLS-Route", 1, "") in ctx.edits
    assert not [e for e in ctx.edits if e[0] == "add" and e[1].startswith("X-RequireTLS")]
    assert ("add", "TLS-Required", "No") in ctx.edits
    ctx2 = ctx
    rc = _feed(ctx2, b"From: a@corp.example\nSubject: [requiretls] secret\n\nbody\n")
    assert rc == Milter.REJECT and ctx2._reply[:2] == ("550", "5.7.30")


def test_carrier_from_the_front_smtpd_is_the_parameter_and_is_removed(
    ctx: TestCtx, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the SMTP front ({daemon_name} = requiretls-front) Require-TLS-ESMTP: yes means the client gave
    MAIL FROM ... REQUIRETLS: class requiretls, reason the parameter, and the field leaves the message."""
    ctx._setsymval("{daemon_name}", "requiretls-front")
    with caplog.at_level("INFO", logger="requiretls"):
        rc = _feed(ctx, b"Require-TLS-ESMTP: yes\nFrom: a@corp.example\nSubject: hi\n\nbody\n", ip="192.0.2.9")
    assert rc == Milter.ACCEPT
    assert ("chg", "Require-TLS-ESMTP", 1, "") in ctx.edits
    assert ctx._msg["X-RequireTLS-Route"] == "relay"
    line = next(r.getMessage() for r in caplog.records if "class=" in r.getMessage())
    assert "class=requiretls" in line and "MAIL FROM REQUIRETLS" in line


def test_carrier_elsewhere_is_not_the_parameter(ctx: TestCtx, caplog: pytest.LogCaptureFixture) -> None:
    """From any other smtpd the field stays what it was (Postfix 3.11's carrier), never read as the parameter."""
    ctx._setsymval("{daemon_name}", "smtpd")
    with caplog.at_level("INFO", logger="requiretls"):
        _feed(ctx, b"Require-TLS-ESMTP: yes\nFrom: a@corp.example\nSubject: hi\n\nbody\n", ip="192.0.2.9")
    assert not any(e[:2] == ("chg", "Require-TLS-ESMTP") for e in ctx.edits)
    line = next(r.getMessage() for r in caplog.records if "class=" in r.getMessage())
    assert "MAIL FROM REQUIRETLS" not in line
