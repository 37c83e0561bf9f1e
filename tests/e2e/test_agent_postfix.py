"""The delivery agent as a Postfix citizen (issue 16), on 3.7 and 3.10 where the agent itself delivers REQUIRETLS
mail (3.11 re-injects into Postfix's own smtp client, which does all this itself).

The agent is given no relayhost, HELO name or credentials of its own: it reads main.cf (postconf) and the
tables (postmap -q).  A relay that requires SASL AUTH after STARTTLS runs in the test process
(tests/testbed/relay_server.py) on mx.dane.test's address and a spare port, with the bed CA's certificate for
that name: a configured next hop without TLSA is authenticated with PKIX."""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.plugin import Plugin
from tests.e2e.test_relay import SENDER, _message
from tests.testbed.hosts import MX_BY_KEY
from tests.testbed.relay_server import RelayOptions, RelayServer

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]

RELAY_NAME = "mx.dane.test"
BIND = "127.0.0.44"


@pytest.fixture
def agent_plugin(plugin: Plugin) -> Plugin:
    if plugin.pf.version == "3.11":
        pytest.skip("3.11 delivers REQUIRETLS with Postfix's own smtp client (SASL, HELO, bind are Postfix's)")
    plugin.relay_helo = None  # the agent must take Postfix's myhostname
    return plugin


def _relay(plugin: Plugin, options: RelayOptions) -> RelayServer:
    files = plugin.bed.pki.mx("dane")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return RelayServer(ctx, MX_BY_KEY["dane"].ip, plugin.pf.ports.extra[7], options, RELAY_NAME)


@pytest.fixture
def sasl_relay(agent_plugin: Plugin) -> Iterator[RelayServer]:
    with _relay(agent_plugin, RelayOptions(users={"agent": "s3cret"})) as r:
        yield r


def _start(plugin: Plugin, **main_cf: str) -> None:
    plugin.table = "insecure.test requiretls=yes\n"
    plugin.apply()
    plugin.pf.set(**main_cf)
    for daemon in ("milter", "relay", "policyd"):
        plugin.start_daemon(daemon)
    plugin.pf.start()


def _wait(relay: RelayServer, n: int = 1, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while len(relay.deliveries) < n and time.monotonic() < end:
        time.sleep(0.2)


def _sasl_main_cf(plugin: Plugin, relay: RelayServer, password: str) -> dict[str, str]:
    hop = f"[{RELAY_NAME}]:{relay.controller.port}"
    table = plugin.pf.config_dir / "sasl_passwd"
    table.write_text(f"{hop} agent:{password}\n")
    return {"relayhost": hop, "smtp_sasl_auth_enable": "yes", "smtp_sasl_password_maps": f"texthash:{table}",
            "smtp_bind_address": BIND}


def test_sasl_relayhost_gets_requiretls_mail_with_auth_helo_and_bind_from_main_cf(
        agent_plugin: Plugin, sasl_relay: RelayServer) -> None:
    plugin = agent_plugin
    _start(plugin, **_sasl_main_cf(plugin, sasl_relay, "s3cret"))
    q = plugin.pf.submit(SENDER, ["bob@insecure.test"], _message(["bob@insecure.test"]))
    _wait(sasl_relay)
    assert sasl_relay.deliveries, plugin.log("relay")[-3000:]
    (d,) = sasl_relay.deliveries
    assert d.requiretls and d.tls and d.auth_user == "agent", d
    assert d.helo == "postfix.local.test"  # myhostname
    assert d.peer == BIND  # smtp_bind_address
    assert "bob@insecure.test" in d.rcpt_tos
    assert plugin.bed.mx("insecure").deliveries() == []
    # Postfix's own status=sent line names the real relay (the LMTP reply text), not the agent's socket.
    m = plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@insecure\.test>.*status=sent", timeout=30)
    assert f"relay={RELAY_NAME}[" in m.line and "requiretls=yes" in m.line and "verify=pkix" in m.line, m.line


def test_wrong_sasl_password_defers_then_delivers_once_fixed(agent_plugin: Plugin, sasl_relay: RelayServer) -> None:
    """The mail-loss case of the issue: 535 (and 530) from the relay are about our configuration: deferred, never
    bounced; once the table is right the queue run delivers it."""
    plugin = agent_plugin
    main_cf = _sasl_main_cf(plugin, sasl_relay, "wrong")
    _start(plugin, **main_cf)
    q = plugin.pf.submit(SENDER, ["bob@insecure.test"], _message(["bob@insecure.test"]))
    m = plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@insecure\.test>.*status=deferred", timeout=60)
    assert "dsn=4.7" in m.line and "535" in m.line, m.line
    assert "wrong" not in plugin.log("relay")  # the password is never logged
    assert plugin.pf.find_log(rf"{q.queue_id}: to=<bob@insecure\.test>.*status=bounced") is None
    assert sasl_relay.deliveries == []
    _sasl_main_cf(plugin, sasl_relay, "s3cret")  # postmap -q reads the table at each delivery
    plugin.pf.flush()
    _wait(sasl_relay)
    (d,) = sasl_relay.deliveries
    assert d.requiretls and d.auth_user == "agent"


def test_sender_dependent_relayhost_is_honoured(agent_plugin: Plugin) -> None:
    plugin = agent_plugin
    with _relay(plugin, RelayOptions()) as relay:
        hop = f"[{RELAY_NAME}]:{relay.controller.port}"
        _start(plugin, sender_dependent_relayhost_maps=f"inline:{{{SENDER}={hop}}}")
        plugin.pf.submit(SENDER, ["bob@insecure.test"], _message(["bob@insecure.test"]))
        _wait(relay)
        assert relay.deliveries, plugin.log("relay")[-3000:]
        d = relay.deliveries[0]
        assert d.requiretls and d.tls and "bob@insecure.test" in d.rcpt_tos
        assert plugin.bed.mx("insecure").deliveries() == []


EIGHT_BIT_BODY = "Grüße aus Köln: 8-bit body line\r\n.a dot line\r\nnaïve ünïcödé\r\n"


def _8bit_message(rcpt: str, extra: str = "") -> bytes:
    return (f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: 8bit e2e\r\nMessage-ID: <{time.time_ns()}@sender.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            f"\r\n{EIGHT_BIT_BODY}{extra}").encode()


def test_mx_without_8bitmime_smtputf8_small_size(agent_plugin: Plugin) -> None:
    """RFC 6152: 8-bit mail to an MX without 8BITMIME arrives 7-bit clean and decodes to the original; RFC 6531
    3.5: SMTPUTF8 mail to an MX without SMTPUTF8 bounces 5.6.7; RFC 1870: a message over the MX's SIZE bounces
    5.3.4 and is never sent."""
    import email
    import email.policy

    plugin = agent_plugin
    with _relay(plugin, RelayOptions(eightbitmime=False, smtputf8=False, size=20_000)) as relay:
        _start(plugin, relayhost=f"[{RELAY_NAME}]:{relay.controller.port}")
        q8 = plugin.pf.submit(SENDER, ["bob@insecure.test"], _8bit_message("bob@insecure.test"),
                              mail_options=["BODY=8BITMIME"])
        _wait(relay)
        assert relay.deliveries, plugin.log("relay")[-3000:]
        d = relay.deliveries[0]
        assert d.requiretls and not any(b > 127 for b in d.raw), d.raw
        msg = email.message_from_bytes(d.raw, policy=email.policy.default)
        assert msg["Content-Transfer-Encoding"] == "quoted-printable"
        assert msg.get_payload(decode=True).replace(b"\r\n", b"\n") == EIGHT_BIT_BODY.encode().replace(b"\r\n", b"\n")
        plugin.pf.wait_log(rf"{q8.queue_id}: to=<bob@insecure\.test>.*status=sent", timeout=30)

        qs = plugin.pf.submit(SENDER, ["carol@insecure.test"],
                              _8bit_message("carol@insecure.test", "x" * 40_000 + "\r\n"),
                              mail_options=["BODY=8BITMIME"])
        plugin.pf.wait_log(rf"{qs.queue_id}: to=<carol@insecure\.test>.*dsn=5\.3\.4, status=bounced", timeout=60)

        qu = plugin.pf.submit(SENDER, ["dörte@insecure.test"], _8bit_message("dörte@insecure.test"),
                              mail_options=["BODY=8BITMIME", "SMTPUTF8"])
        plugin.pf.wait_log(rf"{qu.queue_id}: to=<dörte@insecure\.test>.*dsn=5\.6\.7, status=bounced", timeout=60)
        time.sleep(1)
        # (the DSNs to the sender go out through the same relayhost: only the sender's own messages count)
        sent = [x for x in relay.deliveries if x.mail_from == SENDER]
        assert [x.rcpt_tos for x in sent] == [("bob@insecure.test",)]


def test_sighup_rereads_postfix_settings(agent_plugin: Plugin) -> None:
    """main.cf changed (smtp_helo_name, relayhost): after SIGHUP the agent uses the new values, no restart."""
    import signal

    plugin = agent_plugin
    with _relay(plugin, RelayOptions()) as relay:
        _start(plugin)  # no relayhost yet: insecure.test's own MX, unvalidated: 5.7.10
        q1 = plugin.pf.submit(SENDER, ["bob@insecure.test"], _message(["bob@insecure.test"]))
        plugin.pf.wait_log(rf"{q1.queue_id}: to=<bob@insecure\.test>.*dsn=5\.7\.10, status=bounced", timeout=60)
        plugin.pf.set(smtp_helo_name="reloaded.local.test", relayhost=f"[{RELAY_NAME}]:{relay.controller.port}")
        seen = len(plugin.log("relay"))
        plugin.procs["relay"].send_signal(signal.SIGHUP)
        end = time.monotonic() + 15
        while not re.search(r"reload=done.*helo=reloaded\.local\.test", plugin.log("relay")[seen:]):
            assert time.monotonic() < end, plugin.log("relay")[-2000:]
            time.sleep(0.1)
        plugin.pf.submit(SENDER, ["carol@insecure.test"], _message(["carol@insecure.test"]))
        _wait(relay)
        sent = [d for d in relay.deliveries if "carol@insecure.test" in d.rcpt_tos]
        assert sent and sent[0].requiretls and sent[0].helo == "reloaded.local.test", relay.deliveries


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


BIG = 50 * 1024 * 1024
MiB = 1024 * 1024


def test_50mb_message_streams_through_the_agent_with_bounded_memory(agent_plugin: Plugin) -> None:
    """A 50 MB REQUIRETLS message goes through the agent without being held in memory: the LMTP DATA is spooled
    to a file and sent on in chunks.  The agent's peak RSS (VmHWM) stays within 30 MB of its RSS before the
    message (whole-message reads take the message at least twice: aiosmtpd's lines and the joined bytes), and
    its RSS after is back near the start."""
    plugin = agent_plugin
    with _relay(plugin, RelayOptions()) as relay:
        _start(plugin, relayhost=f"[{RELAY_NAME}]:{relay.controller.port}", message_size_limit=str(60 * MiB))
        pid = plugin.procs["relay"].pid
        # A small message first: the agent has done one delivery (imports, TLS, DNS) before the baseline.
        plugin.pf.submit(SENDER, ["bob@insecure.test"], _message(["bob@insecure.test"]))
        _wait(relay)
        assert relay.deliveries, plugin.log("relay")[-3000:]
        time.sleep(0.5)
        base = _memory(pid)
        line = b"0123456789abcdefghijklmnopqrstuvwxyz.ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789\r\n"
        head = (f"From: {SENDER}\r\nTo: carol@insecure.test\r\nSubject: 50 MB\r\n"
                f"Message-ID: <{time.time_ns()}@sender.test>\r\n\r\n").encode()
        body = line * (BIG // len(line))
        started = time.monotonic()
        q = plugin.pf.submit(SENDER, ["carol@insecure.test"], head + body, timeout=120)
        _wait(relay, 2, timeout=120)
        took = time.monotonic() - started
        assert len(relay.deliveries) == 2, plugin.log("relay")[-3000:]
        d = relay.deliveries[1]
        assert d.requiretls and d.tls and d.rcpt_tos == ("carol@insecure.test",)
        assert len(d.raw) > BIG - MiB and d.raw.endswith(body), len(d.raw)  # every byte arrived
        plugin.pf.wait_log(rf"{q.queue_id}: to=<carol@insecure\.test>.*status=sent", timeout=30)
        time.sleep(1)
        end = _memory(pid)
        figures = (f"baseline RSS {base['VmRSS'] / MiB:.1f} MiB (peak {base['VmHWM'] / MiB:.1f}), after the 50 MB "
                   f"message peak {end['VmHWM'] / MiB:.1f} MiB, RSS {end['VmRSS'] / MiB:.1f} MiB, {took:.1f} s")
        print(figures)
        assert end["VmHWM"] < base["VmRSS"] + 30 * MiB, figures
        assert end["VmRSS"] < base["VmRSS"] + 10 * MiB, figures
        assert list((plugin.dir / "spool").iterdir()) == []


def test_virtual_alias_to_a_local_domain_is_handed_back_without_relay_local_domains(plugin: Plugin) -> None:
    """relay.local_domains is not set: the agent takes the local domains from Postfix (mydestination =
    $myhostname, localhost; a virtual mailbox domain from a table).  A virtual alias expanded after the milter
    planned the message to nobody@postfix.local.test is delivered here; the remote one goes to its MX with
    REQUIRETLS."""
    from tests.e2e.test_relay import SECRET

    vdomains = plugin.pf.config_dir / "vdomains"
    vdomains.write_text("vmail.test ok\n")
    plugin.table = "virt.test requiretls=yes\n"
    plugin.apply()
    plugin.pf.set(virtual_alias_domains="virt.test", virtual_mailbox_domains=f"texthash:{vdomains}",
                  virtual_alias_maps="inline:{ {va@virt.test = vb@dane.test}, "
                                     "{vl@virt.test = nobody@postfix.local.test} }")
    for daemon in ("milter", "relay", "policyd"):
        plugin.start_daemon(daemon)
    plugin.pf.start()
    assert "local_domains" not in plugin.config.read_text()
    rcpts = ["va@virt.test", "vl@virt.test"]
    plugin.pf.submit(SENDER, rcpts, _message(rcpts))
    (d,) = plugin.wait_mx("dane", timeout=60)
    assert d.rcpt_tos == ("vb@dane.test",) and d.tls and d.requiretls, d.mail_options
    plugin.pf.wait_log(r"to=<nobody@postfix\.local\.test>.*status=sent", timeout=60)
    plugin.pf.wait_queue_empty(60)
    assert plugin.pf.find_log(r"status=bounced") is None, plugin.pf.log()[-2000:]
    mbox = (plugin.pf.dir / "mail" / "nobody").read_text(errors="replace")
    assert mbox.count(SECRET) == 1
