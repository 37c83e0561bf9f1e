"""REQUIRETLS delivery on real Postfix (issue 7): the agent on 3.7/3.10, re-injection into native REQUIRETLS
on 3.11.  Messages are tagged by a local ``requiretls=yes`` destination rule; the test MXs record what they got.
"""

from __future__ import annotations

import email
import email.policy
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.plugin import Plugin
from tests.testbed.records import Delivery

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]

SENDER = "alice@sender.test"
LOCAL = "nobody@postfix.local.test"
SECRET = "SECRET-BODY-LINE-7f3a"


def _start(plugin: Plugin, *domains: str) -> None:
    plugin.table = "".join(f"{d} requiretls=yes\n" for d in domains)
    plugin.start(daemons=("milter", "relay", "policyd"))


def _message(rcpts: list[str]) -> str:
    return (f"From: {SENDER}\r\nTo: {', '.join(rcpts)}\r\nSubject: requiretls e2e\r\n"
            f"Message-ID: <{time.time_ns()}@sender.test>\r\n\r\n{SECRET}\r\n")


def _dsn(plugin: Plugin, timeout: float = 60) -> Delivery:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for d in plugin.bed.mx("sender").deliveries():
            if d.mail_from in ("", "<>"):
                return d
        time.sleep(0.2)
    raise AssertionError(f"no DSN reached the sender's MX:\n{plugin.pf.log()[-3000:]}\n{plugin.log('relay')[-2000:]}")


def _nothing_at(plugin: Plugin, key: str, seconds: float = 2.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert not plugin.bed.mx(key).deliveries(), f"MX {key} must not receive this message"
        time.sleep(0.2)


def _status(raw: bytes) -> list[str]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    out = []
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            for block in part.get_payload():
                if block.get("Status"):
                    out.append(block.get("Status"))
    return out


def test_rule_tagged_message_to_dane_requiretls_domain_is_sent_with_requiretls(plugin: Plugin) -> None:
    _start(plugin, "dane.test")
    plugin.pf.submit(SENDER, ["bob@dane.test"], _message(["bob@dane.test"]))
    (d,) = plugin.wait_mx("dane")
    assert d.tls and d.tls_version == "TLSv1.3"
    assert d.requiretls, d.mail_options  # MAIL FROM:<..> REQUIRETLS over verified TLS
    assert "X-RequireTLS-Route" not in d.message


def test_mx_without_requiretls_bounces_5_7_30_with_headers_only(plugin: Plugin) -> None:
    _start(plugin, "dane-norequiretls.test")
    plugin.pf.submit(SENDER, ["bob@dane-norequiretls.test"], _message(["bob@dane-norequiretls.test"]))
    dsn = _dsn(plugin)
    assert _status(dsn.raw) == ["5.7.30"]
    assert b"Subject: requiretls e2e" in dsn.raw  # the original headers come back
    assert SECRET.encode() not in dsn.raw  # RFC 8689 §5: never the body
    _nothing_at(plugin, "dane-norequiretls")


@pytest.mark.parametrize("domain", ["expired.test", "selfsigned.test", "insecure.test", "dane-mismatch.test",
                                    "dane-nostarttls.test"])
def test_no_authenticated_tls_or_unvalidated_mx_bounces_5_7_10(plugin: Plugin, domain: str) -> None:
    """Bad certificate (MTA-STS domain), an MX neither DNSSEC-signed nor listed by MTA-STS, TLSA records that
    match no certificate (the agent's own DANE match: skipping it would deliver), no STARTTLS at a DANE MX."""
    _start(plugin, domain)
    plugin.pf.submit(SENDER, [f"bob@{domain}"], _message([f"bob@{domain}"]))
    dsn = _dsn(plugin, timeout=90)
    assert _status(dsn.raw) == ["5.7.10"]
    assert SECRET.encode() not in dsn.raw
    _nothing_at(plugin, domain.split(".")[0])


def test_first_mx_unqualified_second_delivers(plugin: Plugin) -> None:
    _start(plugin, "twomx.test")
    plugin.pf.submit(SENDER, ["bob@twomx.test"], _message(["bob@twomx.test"]))
    (d,) = plugin.wait_mx("twomx-2")
    assert d.requiretls and d.tls
    assert plugin.bed.mx("twomx-1").deliveries() == []


def test_servfail_defers_and_once_fixed_is_delivered_once(plugin: Plugin) -> None:
    _start(plugin, "toggle.test")
    with plugin.bed.dns.servfail("toggle.test"):
        q = plugin.pf.submit(SENDER, ["bob@toggle.test"], _message(["bob@toggle.test"]))
        plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@toggle.test>.*status=deferred", timeout=60)
        _nothing_at(plugin, "toggle", 1)
    plugin.bed.dns.flush()
    plugin.pf.flush()
    (d,) = plugin.wait_mx("toggle", timeout=60)
    assert d.requiretls
    plugin.pf.wait_queue_empty(60)
    assert len(plugin.bed.mx("toggle").deliveries()) == 1


def test_local_and_remote_recipient_each_delivered_exactly_once(plugin: Plugin) -> None:
    _start(plugin, "dane.test")
    plugin.pf.submit(SENDER, [LOCAL, "bob@dane.test"], _message([LOCAL, "bob@dane.test"]))
    (d,) = plugin.wait_mx("dane")
    assert d.rcpt_tos == ("bob@dane.test",) and d.requiretls
    # 3.7 and 3.10: the local(8) clone, whose forwarded copies keep REQUIRETLS; 3.11 carries it natively
    local = "local" if plugin.pf.version == "3.11" else "requiretls-local"
    plugin.pf.wait_log(rf"to=<nobody@postfix.local.test>.*relay={local},.*status=sent", timeout=60)
    plugin.pf.wait_queue_empty(60)
    log = plugin.pf.log()
    assert "loops back to myself" not in log and "status=bounced" not in log
    mbox = (plugin.pf.dir / "mail" / "nobody").read_text(errors="replace")
    assert mbox.count(SECRET) == 1 and "X-RequireTLS" not in mbox
    assert len(plugin.bed.mx("dane").deliveries()) == 1


def _pending_connections(path: Path) -> int:
    """Connections waiting to be accepted on the unix socket ``path`` (its Recv-Q in ``ss``)."""
    out = subprocess.run(["ss", "-xlnH"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 5 and f[4] == str(path):
            return int(f[2])
    return 0


def test_agent_killed_during_delivery_defers_then_delivers_exactly_once(plugin: Plugin) -> None:
    """On 3.11 the agent is in the path too (it re-injects rule-tagged mail): the same must hold."""
    _start(plugin, "dane.test")
    agent = plugin.procs["relay"]
    os.killpg(agent.pid, signal.SIGSTOP)  # frozen: Postfix connects and hands over the message, no reply
    try:
        q = plugin.pf.submit(SENDER, ["bob@dane.test"], _message(["bob@dane.test"]))
        # Postfix has connected: its connection waits in the frozen agent's listen queue
        end = time.monotonic() + 30
        while not _pending_connections(plugin.relay_sock):
            assert time.monotonic() < end, "Postfix never connected to the agent"
            time.sleep(0.1)
        time.sleep(1)
    finally:
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(10)
    plugin.procs.pop("relay")
    plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@dane.test>.*status=deferred", timeout=60)
    _nothing_at(plugin, "dane", 1)
    plugin.start_daemon("relay")
    plugin.pf.flush()
    (d,) = plugin.wait_mx("dane", timeout=60)
    assert d.requiretls
    plugin.pf.wait_queue_empty(60)
    assert len(plugin.bed.mx("dane").deliveries()) == 1


@pytest.mark.parametrize(("relay_mx", "delivered"), [("dane", True), ("dane-norequiretls", False)])
def test_relayhost_is_the_one_next_hop_under_the_same_rules(plugin: Plugin, relay_mx: str, delivered: bool) -> None:
    """With a relayhost every Internet recipient goes there: authenticated (DANE here) and REQUIRETLS offered, or
    a 5.7.30 bounce; the recipient domain's own (unvalidated) MX is never used."""
    relayhost = f"[mx.{relay_mx}.test]:25"
    plugin.table = "insecure.test requiretls=yes\n"
    plugin.relay_extra = f'relayhost = "{relayhost}"'
    plugin.apply()
    plugin.pf.set(relayhost=relayhost)
    for daemon in ("milter", "relay", "policyd"):
        plugin.start_daemon(daemon)
    plugin.pf.start()
    plugin.pf.submit(SENDER, ["bob@insecure.test"], _message(["bob@insecure.test"]))
    if delivered:
        d = next(x for x in plugin.wait_mx(relay_mx) if "bob@insecure.test" in x.rcpt_tos)
        assert d.requiretls and d.tls
    else:
        # (on 3.11 the bounce is Postfix's own, under the re-injected message's queue id)
        plugin.pf.wait_log(r"to=<bob@insecure.test>.*dsn=5\.7\.30, status=bounced", timeout=60)
        assert not [x for x in plugin.bed.mx(relay_mx).deliveries() if "bob@insecure.test" in x.rcpt_tos]
    assert plugin.bed.mx("insecure").deliveries() == []
