"""The opt-out loop (issue 19) on real Postfix 3.7 / 3.10 / 3.11: real TLS-deferred mail in a real queue (a DANE
domain whose MX offers no STARTTLS), ``requiretls queue`` / ``notify`` / ``release --optout`` run as the admin
would run them, and the test MX servers and the local mailbox as the witnesses."""

from __future__ import annotations

import json
import mailbox
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.plugin import ROOT, Plugin
from tests.e2e.sasl import PASSWORD, SaslServer
from tests.testbed.bed import Bed

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]

LOCAL_SENDER = "nobody@postfix.local.test"  # a real local user: the notice lands in its mailbox
OUTSIDE_SENDER = "alice@sender.test"
DANE = "bob@dane-nostarttls.test"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _prefix(plugin: Plugin) -> list[str]:
    """How the requiretls commands reach this instance's queue tools: inside its namespaces (and chroot)."""
    pid = plugin.pf._master_pid()
    assert pid is not None
    root = plugin.pf.pv.root
    return ["nsenter", "-t", str(pid), "-m", "-p", "--", *(["chroot", str(root)] if root else [])]


def _configure(plugin: Plugin, delay: float = 0) -> None:
    """Write the [notify] section (after Postfix started: the prefix needs its master's pid)."""
    state = plugin.dir / "state"
    plugin.extra = (f'[notify]\ndelay = {delay}\nstate_dir = "{state}"\n'
                    f'postfix_config_dir = "{plugin.pf.config_dir}"\n'
                    f"postfix_command_prefix = {json.dumps(_prefix(plugin))}\n")
    plugin.write_config()


def _rtls(plugin: Plugin, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "requiretls", args[0], "--config", str(plugin.config), *args[1:]],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PATH": _PATH, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def _postqueue(plugin: Plugin) -> list[dict]:  # type: ignore[type-arg]
    out = plugin.pf.run(["postqueue", "-c", str(plugin.pf.config_dir), "-j"]).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _wait_deferred(plugin: Plugin, queue_id: str, timeout: float = 30) -> dict:  # type: ignore[type-arg]
    plugin.pf.wait_log(rf"{queue_id}: to=<.*status=deferred", timeout=timeout)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for m in _postqueue(plugin):
            if m["queue_id"] == queue_id and m["queue_name"] == "deferred" and m["recipients"][0]["delay_reason"]:
                return m
        time.sleep(0.2)
    raise TimeoutError(f"{queue_id} not in the deferred queue")


def _notices(plugin: Plugin) -> list[mailbox.mboxMessage]:
    path = plugin.pf.dir / "mail" / "nobody"
    if not path.exists():
        return []
    return [m for m in mailbox.mbox(str(path)) if m.get("X-RequireTLS-Notice")]


def _wait_notices(plugin: Plugin, n: int, timeout: float = 30) -> list[mailbox.mboxMessage]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = _notices(plugin)
        if len(got) >= n:
            return got
        time.sleep(0.2)
    raise TimeoutError(f"{len(_notices(plugin))} notices, wanted {n}:\n{plugin.pf.log()[-3000:]}")


def _no_delivery(bed: Bed, key: str, seconds: float = 3.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert bed.mx(key).deliveries() == [], f"MX {key} received a message it must not get"
        time.sleep(0.2)


def _body(m: mailbox.mboxMessage) -> str:
    payload = m.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


@pytest.fixture
def sasl() -> Iterator[SaslServer]:
    with SaslServer() as s:
        yield s


def _start_with_sasl(plugin: Plugin, sasl: SaslServer) -> None:
    plugin.start_with_sasl(sasl.port)
    _configure(plugin)


def _send_sasl(plugin: Plugin, subject: str, rcpt: str = DANE) -> str:
    msg = (f"From: {LOCAL_SENDER}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
           f"Message-ID: <{time.time_ns()}@postfix.local.test>\r\n\r\nbody\r\n")
    with smtplib.SMTP("127.0.0.1", plugin.pf.ports.submission, timeout=30) as s:
        s.ehlo("client.local.test")
        s.login("nobody", PASSWORD)
        s.mail(LOCAL_SENDER)
        s.rcpt(rcpt)
        code, resp = s.data(msg.encode())
    assert code == 250, resp
    return resp.decode().rsplit(" ", 1)[-1]


def test_sasl_user_gets_one_notice_resends_with_the_cookie_and_it_is_delivered(plugin: Plugin,
                                                                                sasl: SaslServer) -> None:
    _start_with_sasl(plugin, sasl)
    qid = _send_sasl(plugin, "quarterly report")
    entry = _wait_deferred(plugin, qid)

    q = _rtls(plugin, "queue", "--json")
    assert q.returncode == 0, q.stderr
    (listed,) = json.loads(q.stdout)
    # requiretls queue --json says what postqueue -j says
    assert (listed["queue_id"], listed["sender"], listed["arrival_time"]) == (qid, entry["sender"],
                                                                              entry["arrival_time"])
    assert [(r["address"], r["delay_reason"]) for r in listed["recipients"]] == [
        (r["address"], r["delay_reason"]) for r in entry["recipients"]]
    assert listed["recipients"][0]["delay_reason"].startswith("TLS is required, but was not offered")
    assert listed["optout_allowed"] is True and listed["requiretls"] is False
    assert listed["sasl_username"] == "nobody"  # Postfix keeps the SASL login in the queue file
    text = _rtls(plugin, "queue")
    assert qid in text.stdout and "opt-out: allowed" in text.stdout

    r = _rtls(plugin, "notify")
    assert r.returncode == 0, r.stderr
    (notice,) = _wait_notices(plugin, 1)
    body = _body(notice)
    assert "[tls-optout]" in body and "TLS-Required: No" in body and DANE in body and qid in body
    assert "TLS is required, but was not offered" in body
    # the notifier runs again (each timer run is a fresh process reading its record): no second notice
    for _ in range(2):
        assert _rtls(plugin, "notify").returncode == 0
    time.sleep(3)
    assert len(_notices(plugin)) == 1

    # the user resends with the cookie: delivered in clear
    _send_sasl(plugin, "[tls-optout] quarterly report")
    (d,) = plugin.wait_mx("dane-nostarttls")
    assert d.tls is False and str(d.message["Subject"]) == "quarterly report"


def test_optout_no_destination_gets_a_notice_without_the_suggestion(plugin: Plugin, sasl: SaslServer) -> None:
    plugin.table = "dane-nostarttls.test optout=no\n"
    _start_with_sasl(plugin, sasl)
    qid = _send_sasl(plugin, "contract")
    _wait_deferred(plugin, qid)
    (listed,) = json.loads(_rtls(plugin, "queue", "--json").stdout)
    assert listed["optout_allowed"] is False
    assert listed["recipients"][0]["optout"] == "destination-optout-no"
    assert _rtls(plugin, "notify").returncode == 0
    (notice,) = _wait_notices(plugin, 1)
    body = _body(notice)
    assert "[tls-optout]" not in body and "TLS-Required: No" not in body
    assert "forbids opt-out (optout=no)" in body
    r = _rtls(plugin, "release", qid, "--optout")
    assert r.returncode == 1 and "optout=no" in r.stderr
    _no_delivery(plugin.bed, "dane-nostarttls", 2)


def test_outside_sender_gets_no_notice(plugin: Plugin) -> None:
    plugin.start()
    _configure(plugin)
    q = plugin.pf.submit(OUTSIDE_SENDER, [DANE])
    _wait_deferred(plugin, q.queue_id)
    r = _rtls(plugin, "notify")
    assert r.returncode == 0, r.stderr
    assert "neither local nor authenticated" in r.stderr
    _no_delivery(plugin.bed, "sender", 3)  # nothing to the outside sender's domain
    assert _notices(plugin) == []
    assert (json.loads(_rtls(plugin, "queue", "--json").stdout))[0]["queue_id"] == q.queue_id


def _deferred_outside(plugin: Plugin) -> str:
    q = plugin.pf.submit(OUTSIDE_SENDER, [DANE], mail_options=["RET=HDRS", "ENVID=rel-42"],
                         rcpt_options=["NOTIFY=FAILURE,DELAY", f"ORCPT=rfc822;{DANE}"])
    _wait_deferred(plugin, q.queue_id)
    return q.queue_id


def _check_released_once(plugin: Plugin, qid: str) -> None:
    (d,) = plugin.wait_mx("dane-nostarttls")
    assert d.tls is False and d.mail_from == OUTSIDE_SENDER and d.rcpt_tos == (DANE,)
    assert {o.upper() for o in d.mail_options} >= {"RET=HDRS", "ENVID=REL-42"}
    (rcpt_opts,) = d.rcpt_options  # one string per recipient
    assert set(rcpt_opts.upper().split()) == {"NOTIFY=FAILURE,DELAY", f"ORCPT=RFC822;{DANE.upper()}"}
    assert d.message["TLS-Required"] == "No" and "X-RequireTLS-Route" not in d.message
    plugin.pf.wait_queue_empty(30)
    _no_delivery(plugin.bed, "dane-nostarttls", 0)
    time.sleep(2)
    assert len(plugin.bed.mx("dane-nostarttls").deliveries()) == 1


def test_release_optout_delivers_once_and_removes_the_original(plugin: Plugin) -> None:
    plugin.start()
    _configure(plugin)
    qid = _deferred_outside(plugin)
    r = _rtls(plugin, "release", qid, "--optout")
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"{qid}: released with TLS-Required: No as " in r.stdout
    new = r.stdout.split(" as ", 1)[1].split()[0]
    assert new != qid and f"old={qid}, new={new}" in r.stderr  # the log line names both ids
    _check_released_once(plugin, qid)
    plugin.pf.wait_log(rf"{new}: to=<{DANE}>.*status=sent")
    plugin.pf.wait_log(rf"{qid}: removed")  # postsuper's line, written by postlogd in its own time


@pytest.mark.parametrize("kill_after", ["held", "submitting", "queued"])
def test_release_killed_at_each_step_loses_and_duplicates_nothing(plugin: Plugin, kill_after: str) -> None:
    plugin.start()
    _configure(plugin)
    qid = _deferred_outside(plugin)
    r = _rtls(plugin, "release", qid, "--optout", env={"REQUIRETLS_TEST_KILL_AFTER": kill_after})
    assert r.returncode == -signal.SIGKILL, r.stderr
    if kill_after == "queued":
        assert len(plugin.wait_mx("dane-nostarttls")) == 1  # the copy goes out; the original waits on hold
    ids = {m["queue_id"]: m["queue_name"] for m in _postqueue(plugin)}
    assert ids.get(qid) == "hold" or (kill_after == "held" and ids.get(qid) == "deferred")
    again = _rtls(plugin, "release", qid, "--optout")
    if kill_after == "submitting":  # whether the copy was queued is unknown: no guess, original kept on hold
        assert again.returncode == 2 and "unknown" in again.stderr
        assert {m["queue_id"]: m["queue_name"] for m in _postqueue(plugin)}.get(qid) == "hold"
        _no_delivery(plugin.bed, "dane-nostarttls", 2)
        again = _rtls(plugin, "release", qid, "--optout", "--force")
    assert again.returncode == 0, again.stderr
    _check_released_once(plugin, qid)


def test_release_refuses_a_requiretls_message(plugin: Plugin) -> None:
    plugin.table = "bogus.test requiretls=yes\n"
    plugin.start()
    _configure(plugin)
    q = plugin.pf.submit(OUTSIDE_SENDER, ["bob@bogus.test"])
    _wait_deferred(plugin, q.queue_id)
    (listed,) = json.loads(_rtls(plugin, "queue", "--json").stdout)
    assert listed["requiretls"] is True and listed["recipients"][0]["kind"] == "requiretls-agent"
    r = _rtls(plugin, "release", q.queue_id, "--optout")
    assert r.returncode == 1 and "REQUIRETLS message" in r.stderr
    # still queued as it was: not held, not removed (qmgr may be retrying it right now: active)
    assert {m["queue_id"]: m["queue_name"] for m in _postqueue(plugin)}[q.queue_id] in ("deferred", "active")


def test_postfix_config_keeps_an_admin_delay_warning_time(plugin: Plugin) -> None:
    """The testbed sets delay_warning_time = 0h: apply must leave it; the template is ours."""
    plugin.apply()
    assert plugin.pf.postconf("-h", "delay_warning_time").strip() == "0h"
    template = Path(plugin.pf.postconf("-h", "bounce_template_file").strip())
    assert "[tls-optout]" in template.read_text()
    # Postfix itself reads the template and expands it (postconf -b): our delay text, with the cookie
    shown = plugin.pf.run(["postconf", "-c", str(plugin.pf.config_dir), "-b", str(template)]).stdout
    assert "with [tls-optout] in" in shown and "TLS-Required: No" in shown and "$myhostname" not in shown
