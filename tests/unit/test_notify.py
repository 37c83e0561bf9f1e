"""The opt-out loop (issue 19) against a faked queue-tool boundary: ``postqueue -j`` and ``postcat`` outputs
are the real ones collected from Postfix 3.7.11, 3.10.13 and 3.11.7 in the testbed (tests/unit/data/notify)."""

from __future__ import annotations

import copy
import json
import smtplib
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any, ClassVar

import pytest

from requiretls.addresses import Endpoint
from requiretls.config import load
from requiretls.errors import ConfigError
from requiretls.notify.notifier import NoticeText, NotifyState, compose, eligible_sender, message_key, run_once
from requiretls.notify.queue import (
    OptoutVerdict,
    QueuedMessage,
    TlsDeferred,
    judge,
    parse_postcat,
    parse_postqueue,
    tls_reason_kind,
)
from requiretls.notify.release import Journal, ReleaseError, ReleaseRefused, release, rewrite_message
from requiretls.notify.tools import PostfixTools
from requiretls.policy import LocalPolicy, PolicyTable
from requiretls.policy.model import OptoutFrom

DATA = Path(__file__).parent / "data" / "notify"
VERSIONS = ("3.7", "3.10", "3.11")
AGENT = ("requiretls/relay.sock",)
LOCAL = frozenset({"postfix.local.test"})
TEXT = NoticeText("[tls-optout]", "postfix.local.test", "")


def _queue(version: str) -> list[QueuedMessage]:
    return parse_postqueue((DATA / f"postqueue-{version}.jsonl").read_text())


def _msg(version: str, domain: str) -> QueuedMessage:
    return next(m for m in _queue(version) if m.recipients[0].address.endswith("@" + domain))


def _postcat(version: str, kind: str) -> str:
    return (DATA / f"postcat-{kind}-{version}.txt").read_text()


# --- the reasons Postfix records -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_every_tls_deferral_in_the_real_queue_is_recognised(version: str) -> None:
    kinds = {m.recipients[0].address.split("@")[1]: tls_reason_kind(m.recipients[0].delay_reason, AGENT)
             for m in _queue(version)}
    assert kinds == {
        "dane-nostarttls.test": "tls-required",  # DANE, MX without STARTTLS (4.7.4)
        "dane-mismatch.test": "certificate",  # TLSA matches nothing (4.7.5)
        "expired.test": "certificate",  # MTA-STS enforce, expired certificate
        "wrongname.test": "certificate",  # MTA-STS enforce, certificate for another name
        "bogus.test": "requiretls-agent",  # the agent's 451 4.4.3 for a REQUIRETLS message
    }


@pytest.mark.parametrize("reason", [
    "connect to mx.example[192.0.2.1]:25: Connection refused",
    "host mx.example[192.0.2.1] said: 450 4.7.1 greylisted, try later (in reply to RCPT TO command)",
    "Host or domain name not found. Name service error for name=x.example type=MX: Host not found, try again",
    "host other.example[requiretls/relay.sock.evil] said: 451 4.4.3 x",
])
def test_other_deferrals_are_not_tls_policy(reason: str) -> None:
    assert tls_reason_kind(reason, AGENT) is None


@pytest.mark.parametrize("reason", [
    "Sender requested REQUIRETLS, but TLS service was not offered by host mx.x[192.0.2.1]",
    "TLS is required, but host mx.x[192.0.2.1] refused to start TLS: 454 4.7.0 TLS not available",
    "Cannot start TLS: handshake failure",
    "Server certificate not trusted",
])
def test_postfix_other_tls_wordings_are_recognised(reason: str) -> None:
    assert tls_reason_kind(reason) is not None


def test_postqueue_garbage_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="line 2"):
        parse_postqueue('{"queue_name": "deferred", "queue_id": "A"}\nnot json\n')


# --- the queue file -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_postcat_gives_dsn_parameters_and_headers(version: str) -> None:
    qf = parse_postcat(_postcat(version, "dane"))
    assert qf.sender == "alice@postfix.local.test"
    assert (qf.envid, qf.ret) == ("abc123", "HDRS")
    (r,) = qf.recipients
    assert r.address == "bob@dane-nostarttls.test"
    assert r.notify == ("FAILURE", "DELAY") and r.orcpt == "rfc822;bob@dane-nostarttls.test"
    assert qf.mail_options() == ["RET=HDRS", "ENVID=abc123"]
    assert r.rcpt_options() == ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;bob@dane-nostarttls.test"]
    assert ("Subject", "testbed message") in qf.headers
    assert qf.sasl_username == ""


def test_postcat_with_both_flags_in_one_run_keeps_headers_and_sasl_login() -> None:
    text = ("*** ENVELOPE RECORDS deferred/A/AB12 ***\nmessage_size: 10 20 1 0 10 32\nsender: a@x.test\n"
            "named_attribute: sasl_method=PLAIN\nnamed_attribute: sasl_username=alice\n"
            "named_attribute: notify_flags=2\nrecipient: b@y.test\n*** MESSAGE CONTENTS deferred/A/AB12 ***\n"
            "Subject: hello\n\tworld\nTLS-Required: No\n\n*** HEADER EXTRACTED deferred/A/AB12 ***\n"
            "*** MESSAGE FILE END deferred/A/AB12 ***\n")
    qf = parse_postcat(text)
    assert qf.sasl_username == "alice" and qf.sendopts == 32
    assert qf.headers == (("Subject", "hello\r\n\tworld"), ("TLS-Required", "No"))
    assert qf.recipients[0].notify == ("SUCCESS",)


# --- judgement ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_requiretls_message_never_offers_optout(version: str) -> None:
    e = judge(_msg(version, "bogus.test"), parse_postcat(_postcat(version, "requiretls")), LocalPolicy(), AGENT)
    assert e is not None and e.requiretls and not e.optout_allowed
    assert [r.optout for r in e.recipients] == [OptoutVerdict.REQUIRETLS]
    assert "X-RequireTLS-Route" in e.requiretls_why


def _dane(version: str = "3.7", policy: LocalPolicy | None = None, headers: tuple[tuple[str, str], ...] = ()
          ) -> TlsDeferred:
    qf = parse_postcat(_postcat(version, "dane"))
    if headers:
        qf = replace(qf, headers=qf.headers + headers)
    e = judge(_msg(version, "dane-nostarttls.test"), qf, policy or LocalPolicy(), AGENT)
    assert e is not None
    return e


def test_plain_dane_deferral_allows_optout() -> None:
    e = _dane()
    assert e.optout_allowed and not e.requiretls
    assert e.recipients[0].reason.startswith("TLS is required, but was not offered")


def test_local_policy_decides_whether_optout_is_allowed() -> None:
    table = PolicyTable.parse("dane-nostarttls.test dane optout=no\n", "policy", "destination")
    e = _dane(policy=LocalPolicy(table=table))
    assert e.recipients[0].optout is OptoutVerdict.DESTINATION and e.recipients[0].rule == "policy:1"
    senders = PolicyTable.parse("@postfix.local.test optout=no\n", "senders", "sender")
    assert _dane(policy=LocalPolicy(senders=senders)).recipients[0].optout is OptoutVerdict.SENDER
    assert _dane(policy=LocalPolicy(optout_from=OptoutFrom.NONE)).recipients[0].optout is OptoutVerdict.DISABLED
    rt = PolicyTable.parse("dane-nostarttls.test requiretls=yes\n", "policy", "destination")
    assert _dane(policy=LocalPolicy(table=rt)).recipients[0].optout is OptoutVerdict.REQUIRETLS
    assert _dane(headers=(("X-Original-TLS-Required", "No"),)).recipients[0].optout is OptoutVerdict.ALREADY
    assert _dane(headers=(("Require-TLS-ESMTP", "yes"),)).requiretls


def test_native_requiretls_sendopts_marks_the_message() -> None:
    qf = replace(parse_postcat(_postcat("3.11", "dane")), sendopts=32)
    e = judge(_msg("3.11", "dane-nostarttls.test"), qf, LocalPolicy(), AGENT)
    assert e is not None and e.requiretls and e.recipients[0].optout is OptoutVerdict.REQUIRETLS


def test_queue_json_form() -> None:
    e = _dane()
    j = e.to_json(now=e.arrival_time + 7200)
    assert j["age_seconds"] == 7200 and j["optout_allowed"] is True and j["requiretls"] is False
    assert j["recipients"][0]["address"] == "bob@dane-nostarttls.test"
    assert j["recipients"][0]["delay_reason"] == _msg("3.7", "dane-nostarttls.test").recipients[0].delay_reason
    json.dumps(j)


# --- the notifier ---------------------------------------------------------------------------------------------


class Outbox:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.sent: list[tuple[str, EmailMessage]] = []
        self.fail = fail

    def __call__(self, msg: EmailMessage, rcpt: str) -> str:
        if self.fail is not None:
            raise self.fail
        self.sent.append((rcpt, msg))
        return f"N{len(self.sent)}"


def _run(entries: list[TlsDeferred], state_dir: Path, outbox: Outbox, now: float, delay: float = 3600,
         authenticated: bool = True) -> None:
    state = NotifyState(str(state_dir))
    with state.locked():
        run_once(entries, state, delay=delay, local_domains=LOCAL, notify_authenticated=authenticated,
                 text=TEXT, send=outbox, now=now)


def test_notice_once_after_the_delay_and_never_again_after_a_restart(tmp_path: Path) -> None:
    e = _dane()
    out = Outbox()
    _run([e], tmp_path, out, now=e.arrival_time + 3599)
    assert out.sent == []  # younger than the delay
    _run([e], tmp_path, out, now=e.arrival_time + 3600)
    assert [r for r, _ in out.sent] == ["alice@postfix.local.test"]
    for later in (3700, 7200, 86400):  # new runs read the record from disk: nothing more
        _run([e], tmp_path, out, now=e.arrival_time + later)
    assert len(out.sent) == 1
    rec = json.loads((tmp_path / "notified.json").read_text())["notified"]
    assert rec[message_key(e)]["state"] == "sent"


def test_outside_sender_is_never_told_but_an_authenticated_one_is(tmp_path: Path) -> None:
    e = replace(_dane(), sender="mallory@elsewhere.test")
    out = Outbox()
    _run([e], tmp_path, out, now=e.arrival_time + 7200)
    assert out.sent == []
    assert eligible_sender(replace(e, sender=""), LOCAL, True) is None
    auth = replace(e, sasl_username="mallory")
    _run([auth], tmp_path, out, now=e.arrival_time + 7200, authenticated=False)
    assert out.sent == []
    _run([auth], tmp_path, out, now=e.arrival_time + 7200)
    assert [r for r, _ in out.sent] == ["mallory@elsewhere.test"]


def test_a_refused_notice_is_tried_again_next_run(tmp_path: Path) -> None:
    e = _dane()
    _run([e], tmp_path, Outbox(fail=smtplib.SMTPServerDisconnected("gone")), now=e.arrival_time + 7200)
    out = Outbox()
    _run([e], tmp_path, out, now=e.arrival_time + 7300)
    assert len(out.sent) == 1


def test_a_run_killed_while_sending_never_sends_twice(tmp_path: Path) -> None:
    e = _dane()
    with pytest.raises(KeyboardInterrupt):  # stands for a kill between the record and the SMTP reply
        _run([e], tmp_path, Outbox(fail=KeyboardInterrupt()), now=e.arrival_time + 7200)
    out = Outbox()
    _run([e], tmp_path, out, now=e.arrival_time + 7300)
    assert out.sent == []
    rec = json.loads((tmp_path / "notified.json").read_text())["notified"]
    assert rec[message_key(e)]["state"] == "sending"


def test_damaged_record_stops_the_run_instead_of_notifying_everything_again(tmp_path: Path) -> None:
    (tmp_path / "notified.json").write_text("{not json")
    with pytest.raises(RuntimeError, match=r"notified\.json"):
        _run([_dane()], tmp_path, Outbox(), now=_dane().arrival_time + 7200)


def _body(msg: EmailMessage) -> str:
    part = msg.get_body()
    assert part is not None
    return str(part.get_content())


def test_notice_text_explains_the_optout_only_where_allowed() -> None:
    e = _dane()
    allowed = compose(e, TEXT, now=e.arrival_time + 7200)
    body = _body(allowed)
    assert allowed["To"] == "alice@postfix.local.test" and allowed["Auto-Submitted"] == "auto-generated"
    assert "[tls-optout]" in body and "TLS-Required: No" in body
    assert "<bob@dane-nostarttls.test>" in body and "TLS is required, but was not offered" in body
    assert e.queue_id in body and "2 hours" in body
    table = PolicyTable.parse("dane-nostarttls.test dane optout=no\n", "policy", "destination")
    forbidden = _body(compose(_dane(policy=LocalPolicy(table=table)), TEXT, now=e.arrival_time + 7200))
    assert "[tls-optout]" not in forbidden and "TLS-Required: No" not in forbidden
    assert "optout=no" in forbidden
    rt = judge(_msg("3.7", "bogus.test"), parse_postcat(_postcat("3.7", "requiretls")), LocalPolicy(), AGENT)
    assert rt is not None
    rt_body = _body(compose(rt, TEXT, now=rt.arrival_time + 7200))
    assert "[tls-optout]" not in rt_body and "TLS-Required: No" not in rt_body
    assert "REQUIRETLS" in rt_body and "returned to you (bounce)" in rt_body


# --- release --------------------------------------------------------------------------------------------------


RAW = (b"Received: from client.local.test\n\tby postfix.local.test\nFrom: alice@postfix.local.test\n"
       b"X-RequireTLS-Route: relay\nX-Original-TLS-Required: maybe\nSubject: hi\n\nbody line\n")


class FakeTools(PostfixTools):
    """A queue of one message whose ``postsuper`` moves it between queues like Postfix."""

    def __init__(self, version: str = "3.10.13", relayhost: str = "") -> None:
        object.__setattr__(self, "state", {
            "entry": json.loads((DATA / "postqueue-3.7.jsonl").read_text().splitlines()[3]),
            "postcat": _postcat("3.7", "dane"), "raw": RAW, "calls": [],
            "postconf": {"mail_version": version, "relayhost": relayhost},
        })

    @property
    def st(self) -> dict[str, Any]:
        return self.__getattribute__("state")  # type: ignore[no-any-return]

    @property
    def qid(self) -> str:
        return str(self.st["entry"]["queue_id"])

    def postqueue_json(self) -> str:
        e = self.st["entry"]
        return json.dumps(e) + "\n" if e else ""

    def postcat_envelope_headers(self, queue_id: str) -> str | None:
        return self.st["postcat"] if self.st["entry"] else None

    def postcat_message(self, queue_id: str) -> bytes | None:
        return self.st["raw"] if self.st["entry"] else None

    def postsuper(self, *args: str) -> str:
        self.st["calls"].append(args)
        e = self.st["entry"]
        if args[0] == "-h":
            e["queue_name"] = "hold"
        elif args[0] == "-H":
            e["queue_name"] = "deferred"
        elif args[0] == "-d":
            self.st["entry"] = None
        return ""

    def postconf(self, *names: str) -> dict[str, str]:
        return dict(self.st["postconf"])


class FakeSmtp:
    sessions: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, fail_at: str = "") -> None:
        self.fail_at = fail_at
        self.s: dict[str, Any] = {"rcpts": []}

    def __enter__(self) -> FakeSmtp:
        return self

    def __exit__(self, *a: object) -> None:
        pass

    def ehlo(self) -> tuple[int, bytes]:
        return 250, b"ok"

    def mail(self, sender: str, opts: list[str]) -> tuple[int, bytes]:
        self.s["mail"] = (sender, opts)
        return 250, b"ok"

    def rcpt(self, rcpt: str, opts: list[str]) -> tuple[int, bytes]:
        self.s["rcpts"].append((rcpt, opts))
        return 250, b"ok"

    def data(self, data: bytes) -> tuple[int, bytes]:
        if self.fail_at == "data":
            return 451, b"4.3.0 try later"
        self.s["data"] = data
        FakeSmtp.sessions.append(self.s)
        return 250, b"2.0.0 Ok: queued as NEW123"


class Killed(BaseException):
    pass


class KillingJournal(Journal):
    def __init__(self, state_dir: str, kill_after: str) -> None:
        super().__init__(state_dir)
        self.kill_after = kill_after

    def write(self, queue_id: str, step: str, **extra: Any) -> None:
        super().write(queue_id, step, **extra)
        if step == self.kill_after:
            raise Killed(step)


def _release(tools: FakeTools, journal: Journal, policy: LocalPolicy | None = None, force: bool = False,
             smtp: FakeSmtp | None = None) -> Any:
    return release(tools.qid, tools=tools, policy=policy or LocalPolicy(), journal=journal,
                   reinject=Endpoint("127.0.0.1", 10026), agents=AGENT, force=force, hold_timeout=0,
                   connect=lambda: smtp or FakeSmtp())  # type: ignore[arg-type,return-value]


@pytest.fixture(autouse=True)
def _sessions() -> None:
    FakeSmtp.sessions = []


def test_release_keeps_envelope_and_dsn_and_removes_the_original_after_the_copy(tmp_path: Path) -> None:
    tools = FakeTools()
    qid = tools.qid
    result = _release(tools, Journal(str(tmp_path)))
    assert (result.old, result.new) == (qid, "NEW123")
    (s,) = FakeSmtp.sessions
    assert s["mail"] == ("alice@postfix.local.test", ["RET=HDRS", "ENVID=abc123"])
    assert s["rcpts"] == [("bob@dane-nostarttls.test",
                           ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;bob@dane-nostarttls.test"])]
    assert s["data"].startswith(b"TLS-Required: No\nReceived:")
    assert b"X-RequireTLS-Route" not in s["data"] and b"X-Original-TLS-Required" not in s["data"]
    assert tools.st["calls"] == [("-h", qid), ("-d", qid, "hold")]
    assert tools.st["entry"] is None
    steps = [json.loads(x)["step"] for x in (tmp_path / "release.jsonl").read_text().splitlines()]
    assert steps == ["held", "submitting", "queued", "done"]


def test_release_on_37_marks_the_copy_for_the_relaxed_clone_and_refuses_with_a_relayhost(tmp_path: Path) -> None:
    _release(FakeTools("3.7.11"), Journal(str(tmp_path / "a")))
    assert FakeSmtp.sessions[0]["data"].startswith(b"TLS-Required: No\nX-RequireTLS-Route: relaxed\nReceived:")
    with pytest.raises(ReleaseRefused, match="relayhost"):
        _release(FakeTools("3.7.11", relayhost="[smarthost.example]"), Journal(str(tmp_path / "b")))


def test_release_refuses_requiretls_and_optout_no(tmp_path: Path) -> None:
    tools = FakeTools()
    tools.st["postcat"] = _postcat("3.7", "dane").rstrip("\n") + "\nRequire-TLS-ESMTP: yes\n"
    with pytest.raises(ReleaseRefused, match="REQUIRETLS message"):
        _release(tools, Journal(str(tmp_path)))
    table = PolicyTable.parse("dane-nostarttls.test dane optout=no\n", "policy", "destination")
    tools = FakeTools()
    with pytest.raises(ReleaseRefused, match=r"optout=no\) \(policy:1\)"):
        _release(tools, Journal(str(tmp_path)), LocalPolicy(table=table))
    assert tools.st["calls"] == [] and FakeSmtp.sessions == []


def test_release_refuses_a_message_not_held_by_tls_policy(tmp_path: Path) -> None:
    tools = FakeTools()
    tools.st["entry"]["recipients"][0]["delay_reason"] = "connect to mx[192.0.2.1]:25: Connection refused"
    with pytest.raises(ReleaseRefused, match="not deferred because of TLS policy"):
        _release(tools, Journal(str(tmp_path)))


def test_a_refused_copy_puts_the_original_back(tmp_path: Path) -> None:
    tools = FakeTools()
    with pytest.raises(ReleaseError, match="back in the queue"):
        _release(tools, Journal(str(tmp_path)), smtp=FakeSmtp(fail_at="data"))
    assert tools.st["entry"]["queue_name"] == "deferred"
    assert FakeSmtp.sessions == []


@pytest.mark.parametrize("kill_after", ["held", "queued"])
def test_killed_at_a_safe_step_a_rerun_delivers_exactly_one_copy(tmp_path: Path, kill_after: str) -> None:
    tools = FakeTools()
    with pytest.raises(Killed):
        _release(tools, KillingJournal(str(tmp_path), kill_after))
    assert tools.st["entry"] is not None  # the original is still queued (or on hold)
    _release(tools, Journal(str(tmp_path)))
    assert len(FakeSmtp.sessions) == 1 and tools.st["entry"] is None


def test_killed_while_submitting_the_rerun_does_not_guess(tmp_path: Path) -> None:
    tools = FakeTools()
    with pytest.raises(Killed):
        _release(tools, KillingJournal(str(tmp_path), "submitting"))
    with pytest.raises(ReleaseError, match="unknown"):
        _release(tools, Journal(str(tmp_path)))
    assert tools.st["entry"]["queue_name"] == "hold" and FakeSmtp.sessions == []
    _release(tools, Journal(str(tmp_path)), force=True)
    assert len(FakeSmtp.sessions) == 1 and tools.st["entry"] is None


def test_release_after_done_is_refused(tmp_path: Path) -> None:
    tools = FakeTools()
    saved = copy.deepcopy(tools.st["entry"])
    _release(tools, Journal(str(tmp_path)))
    tools.st["entry"] = saved
    with pytest.raises(ReleaseRefused, match="already released as NEW123"):
        _release(tools, Journal(str(tmp_path)))


def test_rewrite_keeps_folded_fields_and_body() -> None:
    raw = b"Subject: a\n b\nTLS-Required: no\n\tfolded\nX: y\n\nbody\n\nmore\n"
    assert rewrite_message(raw, False) == b"TLS-Required: No\nSubject: a\n b\nX: y\n\nbody\n\nmore\n"


# --- configuration --------------------------------------------------------------------------------------------


def test_notify_settings_and_their_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text('[notify]\ndelay = 60\nsender_domains = ["Example.ORG."]\nfrom = "pm@example.org"\n'
                   'postfix_command_prefix = ["chroot", "/srv/mta"]\n')
    n = load(str(cfg)).notify
    assert (n.delay, n.sender_domains, n.from_, n.postfix_command_prefix) == (
        60.0, frozenset({"example.org"}), "pm@example.org", ("chroot", "/srv/mta"))
    cfg.write_text("[notify]\n\ndelay = -5\n")
    with pytest.raises(ConfigError, match=r"r.toml:3.*notify.delay"):
        load(str(cfg))
    assert load(None).notify.delay == 3600.0
