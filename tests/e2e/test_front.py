"""The SMTP front on Postfix 3.7 and 3.10: a real REQUIRETLS sender (the testbed's Postfix 3.11) delivers to a
3.7 / 3.10 whose smtpd sits behind ``requiretls front`` (wired by ``postfix-config --front``); the message keeps
REQUIRETLS onward or bounces 5.7.30.  Cleartext REQUIRETLS gets 555; a forged carrier is removed; a bare-LF
dot cannot start a second message."""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from requiretls.policy.headers import parse_header_block
from tests.e2e.plugin import ROOT, Plugin
from tests.testbed.bed import Bed
from tests.testbed.pki import POSTFIX_HOSTNAME
from tests.testbed.postfix import Postfix
from tests.testbed.procs import accepts_unix

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]

SENDER = "alice@sender.test"


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError("requiretls front exited")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError("requiretls front did not listen")


def _wait_unix(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError("requiretls front exited")
        if accepts_unix(path):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {path}")


def _with_front(plugin: Plugin, option: str = "smtpd_upstream_proxy_protocol=haproxy", tcp: bool = False,
                listen6: int = 0) -> Plugin:
    """The plugin with the front: Postfix's smtpd moved by ``postfix-config --front`` to the default backend
    (the master.cf unix service ``requiretls-front``, its socket in public/) or, with ``tcp`` (postscreen
    always), to extra[5] on loopback, reading the PROXY protocol; the front on the smtp port where smtpd was
    (and with ``listen6`` on that port of ::1 too)."""
    pf = plugin.pf
    if pf.version not in ("3.7", "3.10"):
        pytest.skip("the front is for Postfix 3.7-3.10; 3.11 receives REQUIRETLS itself")
    tcp = tcp or option.startswith("postscreen")
    backend = pf.ports.extra[5]
    six = f', "[::1]:{listen6}"' if listen6 else ""
    plugin.extra += f'\n[front]\nlisten = ["127.0.0.1:{pf.ports.smtp}"{six}]\n' \
                    + (f'backend = "127.0.0.1:{backend}"\n' if tcp else "") \
                    + f'postfix_config_dir = "{pf.config_dir}"\n'
    plugin.apply_args = ("--front", "--front-service", f"127.0.0.1:{pf.ports.smtp}/inet")
    plugin.apply()
    for d in ("milter", "relay", "policyd"):
        plugin.start_daemon(d)
    line = pf.postconf("-M", f"127.0.0.1:{backend}/inet" if tcp else "requiretls-front/unix")
    assert option in line and (option.startswith("postscreen") or "requiretls-front" in line), line
    # The front first: it takes the port the testbed waits on (Postfix's smtpd is now at the backend).
    logf = open(plugin.dir / "front.log", "ab")  # noqa: SIM115 - kept open for the child's lifetime
    proc = subprocess.Popen([sys.executable, "-m", "requiretls", "front", "--config", str(plugin.config)],
                            stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    plugin.procs["front"] = proc
    _wait_port(pf.ports.smtp, proc)
    pf.start()
    if tcp:
        _wait_port(backend, proc)
    else:
        _wait_unix(pf.queue_dir / "public" / "requiretls-front", proc)
    return plugin


@pytest.fixture
def front(plugin: Plugin) -> Plugin:
    return _with_front(plugin)


@pytest.fixture
def sender_311(bed: Bed, front: Plugin) -> Iterator[Postfix]:
    """Postfix 3.11 as the sending MTA: relays everything to the front, PKIX-verified, REQUIRETLS enforced."""
    try:
        snd = bed.postfix("3.11")
    except Exception as e:  # no 3.11 chroot on this machine
        pytest.skip(f"Postfix 3.11 not available: {e}")
    if snd.running:
        snd.stop()
    snd.reset()
    hop = f"[127.0.0.1]:{front.pf.ports.smtp}"
    snd.set(relayhost=hop,
            smtp_tls_policy_maps=f"inline:{{ {{ {hop} = secure match={POSTFIX_HOSTNAME} }} }}",
            smtp_requiretls_policy="enforce",
            smtp_dns_support_level="enabled")
    snd.start()
    try:
        yield snd
    finally:
        snd.stop()


def test_requiretls_from_postfix_3_11_through_the_front(front: Plugin, sender_311: Postfix) -> None:
    """Received with REQUIRETLS over verified TLS, class requiretls by the parameter, relayed onward with
    REQUIRETLS to a REQUIRETLS MX, bounced 5.7.30 for an MX without it."""
    q = sender_311.submit(SENDER, ["bob@dane.test"], starttls=True, mail_options=["REQUIRETLS"])
    sender_311.wait_log(rf"{q.queue_id}: to=<bob@dane\.test>.*tls=secure/requiretls.*status=sent", timeout=60)
    (d,) = front.wait_mx("dane", timeout=60)
    assert d.requiretls and d.tls
    log = front.log("milter")
    assert "class=requiretls" in log and "MAIL FROM REQUIRETLS" in log, log[-2000:]
    assert "requiretls=yes" in front.log("front")
    assert b"Require-TLS-ESMTP" not in d.raw
    q2 = sender_311.submit(SENDER, ["carol@dane-norequiretls.test"], starttls=True, mail_options=["REQUIRETLS"])
    sender_311.wait_log(rf"{q2.queue_id}: to=<carol@dane-norequiretls\.test>.*status=sent", timeout=60)
    front.pf.wait_log(r"to=<carol@dane-norequiretls\.test>.*dsn=5\.7\.30, status=bounced", timeout=60)


def _client(port: int, host: str = "127.0.0.1") -> smtplib.SMTP:
    s = smtplib.SMTP(host, port, timeout=20, local_hostname="client.local.test")
    s.ehlo()
    return s


def test_cleartext_requiretls_is_refused_and_a_forged_carrier_is_removed(front: Plugin) -> None:
    port = front.pf.ports.smtp
    seen = len(front.log("milter"))  # the log file is shared with earlier tests of this instance
    with _client(port) as s:
        assert "requiretls" not in s.esmtp_features and "starttls" in s.esmtp_features
        code, _ = s.mail(SENDER, ["REQUIRETLS"])
        assert code == 555
        ctx = ssl.create_default_context(cafile=str(front.bed.pki.ca_cert))
        ctx.check_hostname = False
        s.starttls(context=ctx)
        s.ehlo()
        assert "requiretls" in s.esmtp_features and "chunking" not in s.esmtp_features
        msg = (f"Require-TLS-ESMTP: yes\r\nFrom: {SENDER}\r\nTo: bob@dane.test\r\nSubject: forged\r\n\r\n"
               "body\r\n").encode()
        s.sendmail(SENDER, ["bob@dane.test"], msg)
    (d,) = front.wait_mx("dane", timeout=60)
    assert b"Require-TLS-ESMTP" not in d.raw and not d.requiretls
    log = front.log("milter")[seen:]
    assert "class=default" in log and "class=requiretls" not in log, log[-2000:]
    assert "forged Require-TLS-ESMTP removed" in front.log("front")
    # Postfix saw the real client address (PROXY) and the front's TLS trace is in the message
    assert "client=localhost[127.0.0.1]" in front.pf.log() or "client=unknown[127.0.0.1]" in front.pf.log()
    assert b"(requiretls front) with ESMTPS (using TLSv1." in d.raw


def test_smuggling_through_the_front_creates_no_second_message(front: Plugin) -> None:
    """The six end-of-data look-alikes of the hostile-input tests, through the front: the forged second
    transaction (our route field, the carrier) never becomes a message of its own, nor header fields."""
    from tests.e2e.test_hostile import SMUGGLE_ENDINGS, _smuggle

    mark = front.pf.log_mark()
    for ending in SMUGGLE_ENDINGS:
        replies = _smuggle(front.pf, ending)
        assert replies.count(b"250 2.0.0 Ok: queued") <= 1, (ending, replies)
    rec = front.bed.mx("dane")
    rec.wait_for(len(SMUGGLE_ENDINGS), timeout=90)
    front.pf.wait_queue_empty(60)
    time.sleep(2)
    log = front.pf.log_since(mark)
    assert "from=<mallory@sender.test>" not in log
    assert front.bed.mx("dane-nostarttls").deliveries() == []
    got = rec.deliveries()
    assert len(got) == len(SMUGGLE_ENDINGS)
    for d in got:
        names = {n.lower() for n, _ in parse_header_block(d.raw)}
        assert not names & {"x-requiretls-route", "x-requiretls-handback", "x-requiretls-nexthop",
                            "require-tls-esmtp"}, d.raw[:600]
        assert not d.requiretls


def test_sasl_submission_through_the_front_only_over_tls(plugin: Plugin) -> None:
    """smtpd_tls_auth_only = yes in main.cf: the front offers AUTH only after STARTTLS and refuses it in clear;
    over TLS smtpd authenticates (SASL passes through) and the milter sees the login."""
    from tests.e2e.sasl import PASSWORD, SaslServer

    with SaslServer() as sasl:
        plugin.pf.set(smtpd_sasl_auth_enable="yes", smtpd_sasl_type="dovecot",
                      smtpd_sasl_path=f"inet:127.0.0.1:{sasl.port}", smtpd_tls_auth_only="yes")
        front = _with_front(plugin, tcp=True)
        with _client(front.pf.ports.smtp) as s:
            assert "auth" not in s.esmtp_features
            code, _ = s.docmd("AUTH", "PLAIN AGFsaWNlAHNlY3JldA==")
            assert code == 538
            ctx = ssl.create_default_context(cafile=str(front.bed.pki.ca_cert))
            ctx.check_hostname = False
            s.starttls(context=ctx)
            s.ehlo()
            assert "PLAIN" in s.esmtp_features.get("auth", "")
            s.login("alice", PASSWORD)
            s.sendmail(SENDER, ["bob@dane.test"], f"From: {SENDER}\r\nSubject: auth\r\n\r\nx\r\n".encode())
        front.wait_mx("dane", timeout=60)
    assert "sasl_username=alice" in front.log("milter")


def test_postscreen_behind_the_front(plugin: Plugin) -> None:
    """postscreen on the public port before --front: it moves to the backend address reading the PROXY
    protocol, smtpd/pass becomes the front's smtpd; postscreen sees the real client (its log), and a REQUIRETLS
    message from a client that gave the parameter over TLS is class requiretls and goes out with REQUIRETLS."""
    pf = plugin.pf
    smtp = f"127.0.0.1:{pf.ports.smtp}"
    pf.add_service(smtp, "inet", "inet n - n - 1 postscreen")
    pf.add_service("smtpd", "pass", "pass - - n - - smtpd")
    pf.add_service("dnsblog", "unix", "unix - - n - 0 dnsblog")
    pf.add_service("tlsproxy", "unix", "unix - - n - 0 tlsproxy")
    front = _with_front(plugin, "postscreen_upstream_proxy_protocol=haproxy")
    assert "milter_macro_daemon_name=requiretls-front" in pf.postconf("-M", "smtpd/pass")
    _requiretls_over_tls(front, front.pf.ports.smtp)
    assert "postfix/postscreen" in pf.log() and "[127.0.0.1]" in pf.log()


def _requiretls_over_tls(front: Plugin, port: int, host: str = "127.0.0.1") -> None:
    """A client gives REQUIRETLS over TLS through the front: the milter classes the message requiretls and it
    reaches the DANE MX with REQUIRETLS."""
    seen = len(front.log("milter"))
    with _client(port, host) as s:
        ctx = ssl.create_default_context(cafile=str(front.bed.pki.ca_cert))
        ctx.check_hostname = False
        s.starttls(context=ctx)
        s.ehlo()
        assert "requiretls" in s.esmtp_features
        s.sendmail(SENDER, ["bob@dane.test"], f"From: {SENDER}\r\nSubject: rt\r\n\r\nx\r\n".encode(),
                   mail_options=["REQUIRETLS"])
    (d,) = front.wait_mx("dane", timeout=60)
    assert d.requiretls and d.tls
    assert "class=requiretls" in front.log("milter")[seen:]


def test_ipv6_client_through_the_front(plugin: Plugin) -> None:
    """A client over IPv6 (::1): the front hands smtpd its address in the PROXY v2 header (IPv6 family);
    Postfix logs and judges that address (not the front's: relaying is refused until ::1 is in mynetworks),
    and the REQUIRETLS the client gave over TLS takes the REQUIRETLS path."""
    plugin.pf.set(inet_protocols="all")
    port6 = plugin.pf.ports.extra[6]
    front = _with_front(plugin, listen6=port6)
    with _client(port6, "::1") as s:
        s.mail(SENDER)
        code, text = s.rcpt("bob@dane.test")
        assert code == 554 and b"Relay access denied" in text, (code, text)
    front.pf.set(mynetworks="127.0.0.0/8 [::1]/128")
    front.pf.reload()
    _requiretls_over_tls(front, port6, "::1")
    assert re.search(r"postfix/smtpd\[\d+\]: connect from \S*\[::1\]", front.pf.log()), front.pf.log()[-1500:]
    assert "client=::1" in front.log("front")
