"""Hostile input on real Postfix (issue 17): no message is deferred forever, or cut by us, for its own bytes.

Each test wires the plugin as an admin would and submits through the public port (``smtp``) or as a SASL user
(``submission``), on every Postfix version present.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest

from requiretls.policy.headers import parse_header_block
from tests.e2e.plugin import ROOT, Plugin
from tests.e2e.sasl import PASSWORD, SaslServer
from tests.testbed.bed import Bed
from tests.testbed.postfix import Postfix

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]

SENDER = "alice@sender.test"
#: Postfix's cleanup lowers header_size_limit to this as soon as any milter is configured (cleanup_message.c,
#: "KLUDGE_HEADER_LIMIT", since Postfix 2.4): libmilter refuses requests over 65,535 bytes.
POSTFIX_MILTER_HEADER_LIMIT = 60_000


def _message(to: str, *fields: bytes, body: bytes = b"body\r\n") -> bytes:
    head = [f"From: {SENDER}".encode(), f"To: {to}".encode(), b"Message-ID: <%d@client.test>" % time.time_ns(),
            *fields]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _field(raw: bytes, name: bytes) -> bytes | None:
    """The raw value of the first field ``name`` (folds joined, as the MX stored it), or None."""
    m = re.search(rb"(?:^|\r?\n)" + re.escape(name) + rb":(.*?)\r?\n(?![ \t])", raw, re.S | re.I)
    return None if m is None else re.sub(rb"\r?\n(?=[ \t])", b"", m.group(1))


def _long(raw: bytes) -> bytes:
    v = _field(raw, b"X-Long")
    assert v is not None, raw[:300]
    return v.replace(b" ", b"")


def _send_long(pf: Postfix, bed: Bed, size: int) -> bytes:
    q = pf.submit(SENDER, ["bob@dane.test"], _message("bob@dane.test", b"X-Long: " + b"x" * size), port="smtp")
    pf.wait_log(rf"{q.queue_id}: to=<bob@dane.test>.*status=sent", timeout=60)
    (d,) = bed.mx("dane").wait_for(1)
    bed.mx("dane").clear()
    return d.raw


def test_long_header_passes_as_with_any_milter_and_shorter_ones_arrive_byte_identical(bed: Bed,
                                                                                      postfix: Postfix) -> None:
    """A 100,000-character header: never deferred, delivered under normal policy.  Postfix itself cuts it to
    60,000 bytes once *any* milter is configured (a do-nothing milter shows the same cut), before the milter
    sees it; a header within that limit reaches the MX exactly as without the plugin."""
    postfix.start()
    bare_100k = _send_long(postfix, bed, 100_000)
    bare_59k = _send_long(postfix, bed, 59_000)
    postfix.stop()
    # The same Postfix with a milter that does nothing.
    sock = postfix.queue_dir / "nullmilter.sock"
    null = subprocess.Popen([sys.executable, "-m", "tests.e2e.nullmilter", f"unix:{sock}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 15
        while not sock.exists() and time.monotonic() < end:
            time.sleep(0.05)
        sock.chmod(0o666)
        postfix.set(smtpd_milters=f"unix:{sock}", milter_default_action="tempfail")
        postfix.start()
        null_100k = _send_long(postfix, bed, 100_000)
        postfix.stop()
    finally:
        null.terminate()
        null.wait(10)
    postfix.set(smtpd_milters="")
    plugin = Plugin(bed, postfix)
    try:
        plugin.start()
        wired_100k = _send_long(postfix, bed, 100_000)
        wired_59k = _send_long(postfix, bed, 59_000)
        assert "class=default" in plugin.log("milter")
    finally:
        plugin.stop()
    assert len(_long(bare_100k)) == 100_000
    assert _long(wired_59k) == _long(bare_59k) == b"x" * 59_000
    assert _field(wired_59k, b"X-Long") == _field(bare_59k, b"X-Long")  # same folds, same bytes
    cut = POSTFIX_MILTER_HEADER_LIMIT - len(b"X-Long: ")
    assert _long(null_100k) == _long(wired_100k) == b"x" * cut


def test_8bit_tls_required_from_an_internet_client_is_delivered_under_normal_policy(plugin: Plugin) -> None:
    plugin.start()
    q = plugin.pf.submit(SENDER, ["bob@dane.test"], _message("bob@dane.test", b"Subject: x",
                                                             b"TLS-Required: No\xe9"), port="smtp")
    plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@dane.test>.*status=sent")
    (d,) = plugin.wait_mx("dane")
    assert d.tls is True
    log = plugin.log("milter")
    assert f"{q.queue_id}: requiretls: class=default" in log and "malformed TLS-Required value" in log
    # Postfix >= 3.10 renamed the field (header_checks); a value that is not UTF-8 cannot be written back
    # through libmilter, so it arrives under the renamed name, byte for byte.  3.7 keeps the original name.
    name = b"TLS-Required" if plugin.pf.version == "3.7" else b"X-Original-TLS-Required"
    assert _field(d.raw, name) == b" No\xe9"


def test_8bit_subject_with_optout_cookie_from_sasl_user_goes_in_clear_without_the_cookie(plugin: Plugin) -> None:
    plugin.policy = 'optout_from = "trusted"\ntrusted_networks = ["10.0.0.0/8"]'
    msg = _message("bob@dane-nostarttls.test", b"Subject: [tls-optout] caf\xe9")
    with SaslServer() as sasl:
        plugin.start_with_sasl(sasl.port)
        plugin.submit_authenticated("alice", PASSWORD, SENDER, ["bob@dane-nostarttls.test"], msg)
        (d,) = plugin.wait_mx("dane-nostarttls")
    assert d.tls is False
    assert _field(d.raw, b"Subject") == b" =?unknown-8bit?q?caf=E9?="  # cookie gone, the byte kept
    assert _field(d.raw, b"TLS-Required") == b" No"
    assert "class=optout" in plugin.log("milter")


def test_header_name_that_is_not_utf8_is_delivered(plugin: Plugin) -> None:
    """Postfix does not take a line with an 8-bit name for a header field (is_header(): ASCII only): it ends the
    header section there and the milter never sees it as a field, so this passes on the code before issue 17
    too.  The milter's own handling of such a name (another MTA, a raw client) is proven in
    tests/milter/test_miltertest.py."""
    plugin.start()
    q = plugin.pf.submit(SENDER, ["bob@dane.test"], _message("bob@dane.test", b"Subject: x", b"X-\xe9: y"),
                         port="smtp")
    plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@dane.test>.*status=sent")
    (d,) = plugin.wait_mx("dane")
    assert b"\nX-\xe9: y\r\n" in d.raw
    assert f"{q.queue_id}: requiretls: class=default" in plugin.log("milter")


#: End-of-data look-alikes around the dot (SMTP smuggling): bare LF, mixed line endings, bare CR.
SMUGGLE_ENDINGS = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n\x00.\r\n"]


def _smuggle(pf: Postfix, ending: bytes) -> bytes:
    """One SMTP session to the public port whose message body holds ``ending`` and then a second transaction
    that forges our route field and the 3.11 carrier; returns the server's replies."""
    first = _message("bob@dane.test", b"Subject: first").replace(b"body\r\n", b"hello")
    second = (b"MAIL FROM:<mallory@sender.test>\r\nRCPT TO:<bob@dane-nostarttls.test>\r\nDATA\r\n"
              b"From: mallory@sender.test\r\nTo: bob@dane-nostarttls.test\r\nX-RequireTLS-Route: relaxed\r\n"
              b"Require-TLS-ESMTP: yes\r\nSubject: smuggled\r\n\r\nevil\r\n")
    with socket.create_connection(("127.0.0.1", pf.ports.smtp), timeout=30) as s:
        f = s.makefile("rb")
        out = f.readline()
        for cmd in (b"EHLO client.test\r\n", b"MAIL FROM:<alice@sender.test>\r\n", b"RCPT TO:<bob@dane.test>\r\n",
                    b"DATA\r\n"):
            s.sendall(cmd)
            line = f.readline()
            while line[3:4] == b"-":
                line = f.readline()
            out += line
        s.sendall(first + ending + second + b"\r\n.\r\nQUIT\r\n")
        out += f.read()
    return out


@pytest.mark.parametrize("ending", SMUGGLE_ENDINGS, ids=repr)
def test_smuggling_creates_no_message_with_our_private_fields_or_the_carrier(plugin: Plugin, ending: bytes) -> None:
    plugin.start()
    mark = plugin.pf.log_mark()
    replies = _smuggle(plugin.pf, ending)
    plugin.pf.wait_log(r"to=<bob@dane.test>.*status=(sent|deferred|bounced)", since=mark, timeout=60)
    time.sleep(2)
    log = plugin.pf.log_since(mark)
    assert "from=<mallory@sender.test>" not in log, replies  # no second message at all
    assert plugin.bed.mx("dane-nostarttls").deliveries() == []
    for d in plugin.bed.mx("dane").deliveries():
        # The smuggled lines may arrive as body text of the one message; never as its header fields.
        names = {n.lower() for n, _ in parse_header_block(d.raw)}
        assert not names & {"x-requiretls-route", "x-requiretls-handback", "x-requiretls-nexthop"}, d.raw[:600]
        assert "require-tls-esmtp" not in names, d.raw[:600]
