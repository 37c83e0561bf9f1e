"""SIGHUP on real Postfix 3.7 (issue 13): the milter and the delivery agent pick up a changed configuration
without a restart and without dropping a connection in progress.

One Postfix version is enough (the reload is the daemons' own business); 3.7 is the one where the agent
delivers REQUIRETLS mail itself, so both daemons' new state shows in what the MX receives: the milter's new
table routes the message to the agent, and the agent's new ``helo_name`` is the EHLO the MX records.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import time

import pytest

from tests.e2e.plugin import Plugin
from tests.testbed.records import Delivery

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]

SENDER = "alice@sender.test"
RCPT = "bob@dane.test"
OLD_HELO = "relay.local.test"  # what Plugin.write_config gives the agent
NEW_HELO = "reloaded.local.test"


def _message(subject: str) -> str:
    return (f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.time_ns()}@sender.test>\r\n\r\nreload test\r\n")


def _log(plugin: Plugin, daemon: str, since: dict[str, int]) -> str:
    """What ``daemon`` logged in this test (its log file lives on across tests)."""
    return plugin.log(daemon)[since.get(daemon, 0):]


def _wait_logged(plugin: Plugin, daemon: str, pattern: str, since: dict[str, int], timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while not re.search(pattern, _log(plugin, daemon, since)):
        if time.monotonic() > end:
            raise AssertionError(f"{daemon}: {pattern!r} not logged:\n{_log(plugin, daemon, since)[-3000:]}")
        time.sleep(0.1)


def _delivery(plugin: Plugin, subject: str) -> Delivery:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        for d in plugin.bed.mx("dane").deliveries():
            if d.message["Subject"] == subject:
                return d
        time.sleep(0.2)
    raise AssertionError(f"{subject!r} not delivered:\n{plugin.pf.log()[-3000:]}\n{plugin.log('relay')[-2000:]}")


def _sighup(plugin: Plugin, pids: dict[str, int]) -> None:
    for name, pid in pids.items():
        assert plugin.procs[name].poll() is None, f"{name} is not running:\n{plugin.log(name)[-2000:]}"
        os.kill(pid, signal.SIGHUP)


def test_sighup_reloads_milter_table_and_relay_settings_without_a_restart(plugin: Plugin) -> None:
    if plugin.pf.version != "3.7":
        pytest.skip("one Postfix version proves the reload: 3.7, where the agent delivers itself")
    plugin.table = ""
    since = {name: len(plugin.log(name)) for name in ("milter", "relay")}
    plugin.start(daemons=("milter", "relay"))
    pids = {name: plugin.procs[name].pid for name in ("milter", "relay")}

    # Before: no rule for dane.test, so Postfix delivers it itself (3.7 sends no REQUIRETLS).
    q1 = plugin.pf.submit(SENDER, [RCPT], _message("before reload"))
    d1 = _delivery(plugin, "before reload")
    assert not d1.requiretls and d1.helo != OLD_HELO
    assert f"{q1.queue_id}: requiretls: class=default, route=postfix" in plugin.log("milter")

    # Connections in progress across the reload: an SMTP session (smtpd holds its milter connection from
    # connect on) stopped after RCPT, and an LMTP session to the agent.
    smtp = smtplib.SMTP("127.0.0.1", plugin.pf.ports.submission, timeout=30, local_hostname="client.local.test")
    smtp.ehlo()
    assert smtp.mail(SENDER)[0] == 250
    assert smtp.rcpt(RCPT)[0] == 250
    lmtp = smtplib.LMTP(str(plugin.relay_sock), timeout=30)
    assert lmtp.ehlo_or_helo_if_needed() is None and lmtp.noop()[0] == 250

    # The change: a destination rule, and a new EHLO name for the agent.
    (plugin.dir / "policy").write_text("dane.test requiretls=yes\n")
    config = plugin.config.read_text()
    assert f'helo_name = "{OLD_HELO}"' in config
    plugin.config.write_text(config.replace(f'helo_name = "{OLD_HELO}"', f'helo_name = "{NEW_HELO}"'))
    _sighup(plugin, pids)
    for name, pid in pids.items():
        _wait_logged(plugin, name, rf"requiretls/{name}\[{pid}\]: reload=done, table_entries=1, sender_entries=0",
                     since)

    # The held SMTP session's message is judged by the new table, delivered by the agent with its new settings.
    code, reply = smtp.data(_message("held across reload").encode())
    assert code == 250, reply
    smtp.quit()
    m = re.search(rb"queued as ([0-9A-Za-z]+)", reply)
    assert m is not None, reply
    q2 = m.group(1).decode()
    d2 = _delivery(plugin, "held across reload")
    assert d2.requiretls and d2.tls and d2.tls_version == "TLSv1.3"
    assert d2.helo == NEW_HELO
    assert f"{q2}: requiretls: class=requiretls, route=relay" in plugin.log("milter")
    assert lmtp.noop()[0] == 250  # the agent's LMTP connection from before the reload is still served
    lmtp.quit()

    # A new message after the reload: the same.
    plugin.pf.submit(SENDER, [RCPT], _message("after reload"))
    d3 = _delivery(plugin, "after reload")
    assert d3.requiretls and d3.helo == NEW_HELO

    # A broken table at the next SIGHUP: logged with file and line, the last good configuration stays.
    (plugin.dir / "policy").write_text("dane.test requiretls=yes\ndane.test nonsense\n")
    _sighup(plugin, pids)
    for name, pid in pids.items():
        _wait_logged(plugin, name, rf"requiretls/{name}\[{pid}\]: reload=\"failed, keeping the old "
                                   rf"configuration\", error=\"[^\"]*/policy:2: ", since)
    plugin.pf.submit(SENDER, [RCPT], _message("after failed reload"))
    d4 = _delivery(plugin, "after failed reload")
    assert d4.requiretls and d4.helo == NEW_HELO

    for name, pid in pids.items():  # the same processes throughout: started once, never restarted
        assert plugin.procs[name].poll() is None and plugin.procs[name].pid == pid
        text = _log(plugin, name, since)
        assert text.count("listening") == 1
        assert set(re.findall(rf"requiretls/{name}\[(\d+)\]", text)) == {str(pid)}
    plugin.pf.wait_queue_empty(60)
    pflog = plugin.pf.log()
    assert "status=deferred" not in pflog
    assert not re.search(r"warning: .*milter", pflog), pflog[-3000:]  # no milter connection failed
