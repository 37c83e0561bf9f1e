"""``requiretls explain --json`` and the milter (pymilter's test context) give the same answer for the same
message, envelope, client, routes, MTA and local policy: the same header edits, the same MAIL FROM change and
the same rejection.  Both call :func:`requiretls.policy.classify`; this proves the adapters feed it the same.
"""

from __future__ import annotations

import contextlib
import email
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import Milter
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from Milter.testctx import TestCtx

from requiretls.cli import main
from requiretls.config import load
from requiretls.milter.app import RequireTLSMilter
from requiretls.policy import DestinationReadiness, Readiness

TestCtx.__test__ = False  # not a pytest class

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "messages").glob("*.eml"))
_NR = 0
for _flag in ("P_NR_CONN", "P_NR_HELO", "P_NR_MAIL", "P_NR_RCPT", "P_NR_DATA", "P_NR_UNKN", "P_NR_EOH",
              "P_NR_BODY", "P_NR_HDR"):
    _NR |= getattr(Milter, _flag)

#: The MTA as the milter sees it (``v`` macro) and as explain is told.
MTAS = {
    "Postfix 3.7.11": ["--postfix-version", "3.7"],
    "Postfix 3.10.13": ["--postfix-version", "3.10"],
    "Postfix 3.11.7": ["--postfix-version", "3.11"],
    "8.17.1.9": ["--mta", "sendmail"],
}


@dataclass(frozen=True)
class Case:
    raw: bytes
    sender: str
    rcpts: tuple[tuple[str, str, str | None], ...]  # address, {rcpt_mailer}, {rcpt_host}
    params: tuple[str, ...] = ()
    ip: str = "127.0.0.1"
    sasl_user: str | None = None
    tls: str | None = None
    mta: str = "Postfix 3.7.11"
    relayhost: str = ""
    impossible: tuple[str, ...] = ()
    config: str = ""
    tables: dict[str, str] = field(default_factory=dict)


class _Preflight:
    """The milter's pre-flight, answering like ``explain --impossible``."""

    def __init__(self, impossible: tuple[str, ...]) -> None:
        self.impossible = impossible

    def readiness(self, domains: object) -> tuple[tuple[str, DestinationReadiness], ...]:
        return tuple((d, DestinationReadiness(Readiness.IMPOSSIBLE, "pre-flight check"))
                     for d in domains if d in self.impossible)  # type: ignore[attr-defined]


def _milter(case: Case, cfg: Path) -> dict[str, object]:
    """What the milter did to the message: edits as the MTA receives them, chgfrom, reply."""
    policy = load(str(cfg)).local_policy
    RequireTLSMilter.policy_source = staticmethod(lambda: policy)
    RequireTLSMilter.postfix_override = None
    RequireTLSMilter.relayhost = case.relayhost
    RequireTLSMilter.preflight = _Preflight(case.impossible) if case.impossible else None  # type: ignore[assignment]
    Milter.factory = RequireTLSMilter
    c = TestCtx()
    c._opts = TestCtx.default_opts = [Milter.CURR_ACTS, 0x1FFFFF & ~_NR, 0, 0]
    applied: list[tuple[object, ...]] = []
    chgfrom: list[str | None] = []
    c.addheader = lambda f, v, i=-1: applied.append(("add", f, v))
    c.chgheader = lambda f, i, v: applied.append(("chg", f, i, v))
    c.chgfrom = lambda s, p=None: chgfrom.append(p)
    c._setsymval("v", case.mta)
    c._setsymval("i", "4ABC123")
    if case.sasl_user:
        c._setsymval("{auth_authen}", case.sasl_user)
    if case.tls:
        c._setsymval("{tls_version}", case.tls)
    assert c._connect(ip=case.ip) == Milter.CONTINUE
    assert c._envfrom(f"<{case.sender}>", *case.params) == Milter.CONTINUE
    for addr, mailer, host in case.rcpts:
        c._setsymval("{rcpt_mailer}", mailer)
        c._setsymval("{rcpt_host}", host or "")
        assert c._envrcpt(f"<{addr}>") == Milter.CONTINUE
    for name, value in email.message_from_bytes(case.raw).items():
        assert c._header(name, value) == Milter.CONTINUE
    rc = c._eom()
    assert rc in (Milter.ACCEPT, Milter.REJECT)
    return {
        "reply": list(c._reply[:3]) if rc == Milter.REJECT else None,
        "edits": applied,
        "chgfrom": chgfrom,
    }


def _explain(case: Case, cfg: Path, msg: Path) -> dict[str, object]:
    """explain --json, turned into what an adapter applying it would do."""
    args = ["explain", "--config", str(cfg), "--sender", case.sender, "--json", *MTAS[case.mta],
            "--client-ip", case.ip, "--relayhost", case.relayhost]
    for addr, mailer, host in case.rcpts:
        args += ["--rcpt", addr, "--route", f"{addr}={mailer}" + (f":{host}" if host else "")]
    for p in case.params:
        args.append(f"--esmtp={p}")
    if case.sasl_user:
        args += ["--sasl-user", case.sasl_user]
    if case.tls:
        args += ["--tls", case.tls]
    for d in case.impossible:
        args += ["--impossible", f"{d}=pre-flight check"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*args, str(msg)]) == 0
    j = json.loads(out.getvalue())
    if j["reject"] is not None:
        r = j["reject"]
        return {"reply": [str(r["code"]), r["dsn"], r["text"]], "edits": [], "chgfrom": []}
    edits: list[tuple[object, ...]] = []
    for e in j["header_edits"]:
        if e["action"] == "add":
            edits.append(("add", e["name"], e["value"]))
        else:
            edits.append(("chg", e["name"], e["index"], e["value"] if e["action"] == "change" else ""))
    params = " ".join(j["envelope_params"])
    return {"reply": None, "edits": edits, "chgfrom": [params] if params and case.sender else []}


def _compare(case: Case) -> dict[str, object]:
    saved = (RequireTLSMilter.policy_source, RequireTLSMilter.postfix_override, RequireTLSMilter.relayhost,
             RequireTLSMilter.preflight)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            for name, text in case.tables.items():
                (d / name).write_text(text)
            cfg = d / "requiretls.toml"
            cfg.write_text(case.config)
            msg = d / "m.eml"
            msg.write_bytes(case.raw)
            got, want = _milter(case, cfg), _explain(case, cfg, msg)
    finally:
        (RequireTLSMilter.policy_source, RequireTLSMilter.postfix_override, RequireTLSMilter.relayhost,
         RequireTLSMilter.preflight) = saved
    assert got == want
    return got


EXAMPLE_CONFIG = (ROOT / "examples" / "requiretls.toml").read_text()
EXAMPLE_TABLES = {"policy": (ROOT / "examples" / "policy").read_text(),
                  "senders": (ROOT / "examples" / "senders").read_text()}
RCPT_SETS = {
    "remote": (("bob@friend.example", "smtp", None), ("carol@bank.example", "smtp", None)),
    "local+relayhost": (("bob@friend.example", "smtp", None), ("u@corp.example", "local", "corp.example"),
                        ("d@partner.example", "relay", "[relay.example]:587")),
    "requiretls-rule": (("x@agency.gov.example", "smtp", None), ("u@corp.example", "local", "corp.example")),
}


@pytest.mark.parametrize("mta", list(MTAS))
@pytest.mark.parametrize("rcpts", list(RCPT_SETS))
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_explain_and_milter_agree_on_every_example(path: Path, rcpts: str, mta: str) -> None:
    for sender, ip, sasl in (("alice@corp.example", "127.0.0.1", None), ("mallory@outside.example", "192.0.2.99",
                                                                        None), ("legal@corp.example", "192.0.2.99",
                                                                                "legal")):
        for impossible in ((), ("agency.gov.example", "friend.example")):
            _compare(Case(path.read_bytes(), sender, RCPT_SETS[rcpts], ip=ip, sasl_user=sasl, mta=mta,
                          relayhost="[relay.example]:587", impossible=impossible, config=EXAMPLE_CONFIG,
                          tables=EXAMPLE_TABLES))


def test_the_comparison_sees_a_difference() -> None:
    """The harness can fail: a Sendmail milter refuses what explain for Postfix accepts."""
    case = Case(b"Subject: x\n\nbody\n", "alice@corp.example", (("b@d.example", "smtp", None),), ("REQUIRETLS",),
                mta="8.17.1.9")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "c.toml"
        cfg.write_text("")
        msg = Path(tmp) / "m.eml"
        msg.write_bytes(case.raw)
        got = _milter(case, cfg)
        want = _explain(Case(case.raw, case.sender, case.rcpts, case.params, mta="Postfix 3.7.11"), cfg, msg)
    assert got["reply"] == ["550", "5.7.30",
                            "REQUIRETLS cannot be enforced by this MTA; send through a REQUIRETLS-capable relay"]
    assert want["reply"] is None and got != want


# --- generated messages, envelopes, routes and trust settings ----------------------------------------------

DOMAINS = ["a.example", "b.example", "mx.a.example", "c.test", "corp.example"]
HEADER_VALUES = {
    "TLS-Required": ["No", "no", "Yes", "No please", "\n No"],
    "Require-TLS-ESMTP": ["yes", "no"],
    "X-RequireTLS-Route": ["relay", "relaxed"],
    "X-RequireTLS-Handback": ["<u0@a.example>"],
    "X-Original-TLS-Required": ["No"],
    "Subject": ["hello", "[requiretls] x", "[tls-optout] y", "=?utf-8?q?=5Btls-optout=5D_Gr=C3=BC=C3=9Fe?="],
}


@st.composite
def cases(draw: st.DrawFn) -> Case:
    headers = [("From", "x@y.example")]
    for name in draw(st.lists(st.sampled_from(list(HEADER_VALUES)), max_size=4)):
        headers.append((name, draw(st.sampled_from(HEADER_VALUES[name]))))
    raw = "".join(f"{n}: {v}\n" for n, v in headers).encode() + b"\nbody\n"
    n = draw(st.integers(1, 3))
    rcpts = []
    for i in range(n):
        dom = draw(st.sampled_from(DOMAINS))
        mailer = draw(st.sampled_from(["smtp", "smtp", "relay", "local", "virtual", "lmtp"]))
        host = draw(st.sampled_from([None, dom, "[relay.example]:587", "[internal.example]"]))
        rcpts.append((f"u{i}@{dom}", mailer, host))
    dest_lines = []
    for key in draw(st.lists(st.sampled_from([*DOMAINS, ".example"]), unique=True, max_size=3)):
        attrs = draw(st.lists(st.sampled_from(["optout=no", "optout=yes", "requiretls=yes"]), unique_by=lambda a:
                              a.split("=")[0], max_size=2))
        dest_lines.append(f"{key} {draw(st.sampled_from(['dane', 'may', 'secure']))} {' '.join(attrs)}")
    sender_lines = [f"{k} {draw(st.sampled_from(['optout=no', 'optout=yes', 'requiretls=yes']))}"
                    for k in draw(st.lists(st.sampled_from(["alice@a.example", "@c.test", "<>"]), unique=True,
                                           max_size=2))]
    nets = draw(st.sampled_from(['["127.0.0.0/8"]', '["192.0.2.0/24", "::1/128"]', "[]"]))
    config = (f'[policy]\ntable = "policy"\nsender_table = "senders"\n'
              f'optout_from = "{draw(st.sampled_from(["any", "trusted", "none"]))}"\n'
              f"trusted_networks = {nets}\n"
              f'preflight = "{draw(st.sampled_from(["off", "warn", "reject"]))}"\n')
    return Case(
        raw=raw,
        sender=draw(st.sampled_from(["", "alice@a.example", "bob@c.test"])),
        rcpts=tuple(rcpts),
        params=draw(st.sampled_from([(), ("SIZE=10",), ("REQUIRETLS",), ("RET=FULL", "REQUIRETLS"),
                                     ("REQUIRETLS=yes",)])),
        ip=draw(st.sampled_from(["127.0.0.1", "192.0.2.7", "::1", "198.51.100.1"])),
        sasl_user=draw(st.sampled_from([None, "alice"])),
        tls=draw(st.sampled_from([None, "TLSv1.3"])),
        mta=draw(st.sampled_from(list(MTAS))),
        relayhost=draw(st.sampled_from(["", "[relay.example]:587"])),
        impossible=tuple(draw(st.lists(st.sampled_from(DOMAINS), unique=True, max_size=2))),
        config=config,
        tables={"policy": "\n".join(dest_lines) + "\n", "senders": "\n".join(sender_lines) + "\n"},
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_explain_and_milter_agree_on_generated_messages(case: Case) -> None:
    _compare(case)
