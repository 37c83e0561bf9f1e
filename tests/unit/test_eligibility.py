"""The one REQUIRETLS eligibility verdict (RFC 8689 section 4.2.1) and every caller's mapping of it.

Each outcome of :func:`judge` is pinned here, and so is the way each caller turns it into its own answer:
the agent's LMTP reply, ``check``'s exit status and line, the pre-flight's readiness, policyd's strict zone
and the agent's 3.11 pre-check.  Changing a code in any of them fails a test in this file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Sequence

import pytest

from requiretls import check
from requiretls.facts import (
    DaneState,
    Destination,
    DnssecState,
    MxHost,
    MxSource,
    SessionResult,
    SessionStage,
    StsMode,
    StsPolicy,
    StsResult,
    StsStatus,
    TlsaRecord,
    TlsRequirement,
)
from requiretls.milter.preflight import readiness
from requiretls.policy import Readiness
from requiretls.policy.eligibility import Outcome, Verdict, candidates, judge, mx_validated, qualifies
from requiretls.policy.table import PolicyTable
from requiretls.policy.tlsmap import Query, Zone, answer, parse_key
from requiretls.relay.agent import AgentHandler, AgentState
from requiretls.relay.deliver import DeliveryStatus, LmtpEnvelope, SendSettings, deliver_requiretls, verdict_outcome

TLSA = TlsaRecord(3, 1, 1, hashlib.sha256(b"key").digest())


def _host(name: str, secure: bool = True, dane: DaneState = DaneState.NONE, problem: str = "",
          addresses: tuple[str, ...] = ("192.0.2.1",), state: DnssecState = DnssecState.SECURE) -> MxHost:
    tlsa = (TLSA,) if dane is DaneState.USABLE else ()
    return MxHost(name, 10, secure, addresses, state, tlsa=tlsa, dane=dane, problem=problem)


def _dest(*hosts: MxHost, secure: bool = True, requirement: TlsRequirement = TlsRequirement.OPPORTUNISTIC,
          source: MxSource = MxSource.MX, sts: StsResult | None = None, sts_error: str = "",
          reason: str = "test") -> Destination:
    state = DnssecState.SECURE if secure else DnssecState.INSECURE
    return Destination("example.test", source, state, hosts, sts, requirement, reason, 300, sts_error)


def _sts(mode: StsMode, *mx: str, status: StsStatus = StsStatus.FETCHED) -> StsResult:
    return StsResult("example.test", status, StsPolicy(mode, 86400, mx, "1", 0.0), "1")


def _session(host: str, stage: SessionStage = SessionStage.DONE, requiretls: bool = True,
             transient: bool = False, verify_error: str = "", error: str = "") -> SessionResult:
    tls = stage in (SessionStage.DONE, SessionStage.EHLO_TLS, SessionStage.AUTHENTICATE)
    return SessionResult(host, "192.0.2.1", 25, stage, transient, True, tls, "TLSv1.3" if tls else "", "",
                         "pkix", stage is SessionStage.DONE, verify_error, requiretls and stage is SessionStage.DONE,
                         error=error)


SECURE = _dest(_host("mx1.example.test"), _host("mx2.example.test"))
FAILED_FETCH = StsResult("example.test", StsStatus.FETCH_FAILED, None, "1", "MtaStsTimeoutError: timed out")

# (name, destination, sessions or None, outcome, dsn)
CASES: list[tuple[str, Destination, Sequence[SessionResult] | None, Outcome, str]] = [
    ("dns trouble", _dest(requirement=TlsRequirement.DEFER, source=MxSource.ERROR, reason="MX lookup bogus"),
     None, Outcome.DEFER, "4.4.3"),
    ("null MX", _dest(requirement=TlsRequirement.NO_MAIL, source=MxSource.NULL_MX), None, Outcome.BOUNCE, "5.1.10"),
    ("no such domain", _dest(requirement=TlsRequirement.NO_MAIL, source=MxSource.NXDOMAIN), None,
     Outcome.BOUNCE, "5.1.2"),
    ("address lookup of the only MX failed",
     _dest(_host("mx.example.test", problem="address lookup failed", addresses=(),
                 state=DnssecState.INDETERMINATE)), None, Outcome.DEFER, "4.4.3"),
    ("MTA-STS fetch timed out, nothing cached", _dest(_host("mx.example.test", secure=False), secure=False,
                                                       sts=FAILED_FETCH), None, Outcome.DEFER, "4.4.3"),
    ("MTA-STS cache unreadable", _dest(_host("mx.example.test", secure=False), secure=False,
                                       sts_error="cache unreadable"), None, Outcome.DEFER, "4.4.3"),
    ("TXT lookup failed", _dest(_host("mx.example.test", secure=False), secure=False,
                                sts=StsResult("example.test", StsStatus.RECORD_LOOKUP_FAILED, None)),
     None, Outcome.DEFER, "4.4.3"),
    ("insecure MX, no MTA-STS", _dest(_host("mx.example.test", secure=False), secure=False), None,
     Outcome.BOUNCE, "5.7.10"),
    ("insecure MX, MTA-STS testing", _dest(_host("mx.example.test", secure=False), secure=False,
                                           sts=_sts(StsMode.TESTING, "mx.example.test")), None,
     Outcome.BOUNCE, "5.7.10"),
    ("insecure MX, MTA-STS enforce not listing it",
     _dest(_host("mx.example.test", secure=False), secure=False, sts=_sts(StsMode.ENFORCE, "other.example.test")),
     None, Outcome.BOUNCE, "5.7.10"),
    ("insecure MX listed by MTA-STS enforce",
     _dest(_host("mx.example.test", secure=False), secure=False, sts=_sts(StsMode.ENFORCE, "*.example.test")),
     None, Outcome.DELIVER, ""),
    ("secure MX, not probed", SECURE, None, Outcome.DELIVER, ""),
    ("first MX qualifies", SECURE, [_session("mx1.example.test")], Outcome.DELIVER, ""),
    ("second MX qualifies", SECURE, [_session("mx1.example.test", requiretls=False), _session("mx2.example.test")],
     Outcome.DELIVER, ""),
    ("no REQUIRETLS after STARTTLS", SECURE,
     [_session("mx1.example.test", requiretls=False), _session("mx2.example.test", SessionStage.STARTTLS)],
     Outcome.BOUNCE, "5.7.30"),
    ("no authenticated TLS", SECURE,
     [_session("mx1.example.test", SessionStage.HANDSHAKE, verify_error="certificate not valid"),
      _session("mx2.example.test", SessionStage.STARTTLS, error="STARTTLS not offered")],
     Outcome.BOUNCE, "5.7.10"),
    ("DANE mismatch", _dest(_host("mx.example.test", dane=DaneState.USABLE), requirement=TlsRequirement.DANE),
     [_session("mx.example.test", SessionStage.AUTHENTICATE, verify_error="DANE: no-match")],
     Outcome.BOUNCE, "5.7.10"),
    ("one MX unreachable, the other without REQUIRETLS: defer", SECURE,
     [_session("mx1.example.test", SessionStage.CONNECT, transient=True, error="refused"),
      _session("mx2.example.test", requiretls=False)], Outcome.DEFER, "4.4.1"),
    ("a candidate not tried", SECURE, [_session("mx1.example.test", requiretls=False)], Outcome.DEFER, "4.4.1"),
    ("a transient session never delivers", SECURE,
     [dataclasses.replace(_session("mx1.example.test"), transient=True),
      _session("mx2.example.test", requiretls=False)],
     Outcome.DEFER, "4.4.1"),
    ("a qualifying session with an unvalidated MX does not count",
     _dest(_host("mx.example.test", secure=False), _host("rogue.example.test", secure=False), secure=False,
           sts=_sts(StsMode.ENFORCE, "mx.example.test")),
     [_session("mx.example.test", requiretls=False), _session("rogue.example.test")], Outcome.BOUNCE, "5.7.30"),
]


@pytest.mark.parametrize(("dest", "sessions", "outcome", "dsn"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_verdict(dest: Destination, sessions: Sequence[SessionResult] | None, outcome: Outcome, dsn: str) -> None:
    v = judge(dest, sessions)
    assert (v.outcome, v.dsn) == (outcome, dsn), v
    assert v.probed is (sessions is not None and bool(candidates(dest)))
    assert v.reason


def test_the_delivering_mx_is_named() -> None:
    v = judge(SECURE, [_session("mx1.example.test", requiretls=False), _session("mx2.example.test")])
    assert v.mx == "mx2.example.test" and "mx2.example.test is DNSSEC-validated, pkix-verified" in v.reason


def test_mx_validation_step_2() -> None:
    """RFC 8689 section 4.2.1 step 2: DNSSEC, or an enforce MTA-STS policy listing the MX."""
    insecure = _host("mx.example.test", secure=False)
    assert mx_validated(SECURE, SECURE.hosts[0])
    assert mx_validated(_dest(insecure, sts=_sts(StsMode.ENFORCE, "mx.example.test")), insecure)
    assert not mx_validated(_dest(insecure, sts=_sts(StsMode.TESTING, "mx.example.test")), insecure)
    assert not mx_validated(_dest(insecure, sts=_sts(StsMode.NONE)), insecure)
    assert not mx_validated(_dest(insecure), insecure)
    unusable = _host("mx.example.test", problem="MX exchange is an IP address")
    assert candidates(_dest(unusable, SECURE.hosts[0])) == (SECURE.hosts[0],)


def test_qualifies_needs_authenticated_tls_and_requiretls() -> None:
    assert qualifies(_session("mx"))
    assert not qualifies(_session("mx", requiretls=False))
    assert not qualifies(_session("mx", SessionStage.HANDSHAKE))
    assert not qualifies(dataclasses.replace(_session("mx"), verified=False))
    assert not qualifies(dataclasses.replace(_session("mx"), transient=True))


# --- the callers' mappings ----------------------------------------------------------------------------------

DEFER = Verdict(Outcome.DEFER, "4.4.3", "DNS trouble")
BOUNCE_30 = Verdict(Outcome.BOUNCE, "5.7.30", "no REQUIRETLS")
BOUNCE_10 = Verdict(Outcome.BOUNCE, "5.7.10", "no TLS")
DELIVER = Verdict(Outcome.DELIVER, "", "mx is DNSSEC-validated", "mx")


def test_agent_reply_for_each_verdict() -> None:
    d = verdict_outcome(DEFER)
    assert (d.status, d.code, d.dsn, d.lmtp_reply()) == (DeliveryStatus.DEFERRED, 451, "4.4.3",
                                                         "451 4.4.3 DNS trouble")
    b = verdict_outcome(BOUNCE_30)
    assert (b.status, b.code, b.dsn, b.requiretls) == (DeliveryStatus.BOUNCED, 550, "5.7.30", False)
    b = verdict_outcome(BOUNCE_10)
    assert (b.status, b.code, b.dsn, b.requiretls) == (DeliveryStatus.BOUNCED, 550, "5.7.10", None)


@pytest.mark.parametrize(("dest", "code", "dsn"), [
    (CASES[0][1], 451, "4.4.3"), (CASES[1][1], 550, "5.1.10"), (CASES[4][1], 451, "4.4.3"),
    (CASES[8][1], 550, "5.7.10")], ids=["dns", "null-mx", "sts-fetch", "sts-testing"])
def test_agent_never_connects_when_the_facts_already_decide(dest: Destination, code: int, dsn: str) -> None:
    env = LmtpEnvelope("a@s.example", {}, ("b@example.test",))
    out = deliver_requiretls(dest, env, env.rcpts, b"Subject: x\r\n\r\n", SendSettings(port=1, timeout=1))
    o = out["b@example.test"]
    assert (o.code, o.dsn) == (code, dsn), o


def test_check_exit_status_and_line() -> None:
    assert [check.EXIT_CODE[v.outcome] for v in (DELIVER, BOUNCE_30, DEFER)] == [0, 1, 2]
    assert check.verdict_line(DEFER) == ("REQUIRETLS delivery possible: no — lookup error, try later: DNS trouble"
                                         " [4.4.3]")
    assert check.verdict_line(BOUNCE_30) == "REQUIRETLS delivery possible: no — no REQUIRETLS [5.7.30]"
    assert check.verdict_line(DELIVER) == "REQUIRETLS delivery possible: yes — mx is DNSSEC-validated (use --probe)"
    probed = dataclasses.replace(DELIVER, probed=True)
    assert check.verdict_line(probed) == "REQUIRETLS delivery possible: yes — mx is DNSSEC-validated"


def test_preflight_readiness_for_each_verdict() -> None:
    r = readiness(DEFER)
    assert r.readiness is Readiness.UNKNOWN
    r = readiness(BOUNCE_10)
    assert (r.readiness, r.dsn, r.reason) == (Readiness.IMPOSSIBLE, "5.7.10", "no TLS")
    r = readiness(BOUNCE_30)
    assert (r.readiness, r.dsn) == (Readiness.IMPOSSIBLE, "5.7.30")
    assert readiness(DELIVER).readiness is Readiness.POSSIBLE


@pytest.mark.parametrize(("dest", "wire"), [
    (CASES[0][1], "TEMP 4.4.3 MX lookup bogus"),
    (CASES[4][1], "TEMP 4.4.3 MX not DNSSEC-signed and its MTA-STS policy could not be learnt now: "
                  "MtaStsTimeoutError: timed out"),
    # a bounce verdict: a level 3.11 refuses for REQUIRETLS at once (5.7.10), never cleartext, never days of TEMP
    (CASES[7][1], "OK encrypt"),
    # RFC 8461 section 4.1: the wildcard *.example.test names the MX host it matches, exactly
    (CASES[10][1], "OK secure match=mx.example.test servername=hostname"),
    (SECURE, "OK secure match=hostname"),
    (_dest(_host("mx.example.test", dane=DaneState.USABLE), requirement=TlsRequirement.DANE), "OK dane-only"),
], ids=["dns", "sts-fetch", "unvalidated", "sts-enforce", "dnssec-pkix", "dane"])
def test_policyd_strict_zone_follows_the_verdict(dest: Destination, wire: str) -> None:
    query = parse_key("example.test")
    assert isinstance(query, Query)
    got = answer(Zone.STRICT, query, PolicyTable.empty("destination"), dest)
    assert got.wire() == wire


class _Resolver:
    def __init__(self, dest: Destination) -> None:
        self.dest = dest

    async def lookup(self, domain: str) -> Destination:
        return self.dest


@pytest.mark.parametrize(("dest", "reply"), [
    (CASES[0][1], "451 4.4.3 MX lookup bogus"), (CASES[7][1], "550 5.7.10"), (SECURE, None),
    (CASES[4][1], "451 4.4.3")], ids=["dns", "unvalidated", "secure", "sts-fetch"])
def test_agent_precheck_on_3_11_follows_the_verdict(dest: Destination, reply: str | None) -> None:
    handler = AgentHandler(_Resolver(dest), AgentState())  # type: ignore[arg-type]
    rcpt, outcome = asyncio.run(handler._precheck("b@example.test", "example.test"))
    assert rcpt == "b@example.test"
    if reply is None:
        assert outcome is None
    else:
        assert outcome is not None and outcome.lmtp_reply().startswith(reply), outcome
