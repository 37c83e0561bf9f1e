"""The SMTP front against a recording stand-in for smtpd (the real smtpd is in tests/e2e/test_front.py): what
the front changes in the dialogue, what it refuses itself, and that the message smtpd receives is exactly the
one the client sent, minus forged carrier fields."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from requiretls.front import protocol as p
from requiretls.front.server import Front, FrontSettings
from tests.unit.tlsutil import client_context, server_context


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def event_loop_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test on both event loops the front's workers run on (uvloop where it is installed, see
    ``requiretls.front.cli.loop_factory``): ``asyncio.run`` takes its loop from the policy set here."""
    if request.param == "asyncio":
        yield "asyncio"
        return
    uvloop = pytest.importorskip("uvloop")
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield "uvloop"
    finally:
        asyncio.set_event_loop_policy(None)


def test_the_loop_is_the_one_asked_for(event_loop_kind: str) -> None:
    async def go() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]
    assert asyncio.run(go()) == event_loop_kind


# --- pure parts ----------------------------------------------------------------------------------------------


def test_ehlo_rewrite_before_and_after_tls() -> None:
    rep = (b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n"
           b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n")
    before = p.rewrite_ehlo(rep, tls_active=False, tls_offered=True, auth_only=True)
    assert before.split(b"\r\n")[:-1] == [b"250-mx.example", b"250-PIPELINING", b"250-SIZE 1000",
                                          b"250-ENHANCEDSTATUSCODES", b"250-8BITMIME", b"250-DSN",
                                          b"250-SMTPUTF8", b"250 STARTTLS"]
    after = p.rewrite_ehlo(rep, tls_active=True, tls_offered=True, auth_only=True)
    lines = after.split(b"\r\n")[:-1]
    assert b"250-AUTH PLAIN LOGIN" in lines and lines[-1] == b"250 REQUIRETLS"
    assert not any(b"STARTTLS" in ln or b"CHUNKING" in ln for ln in lines)
    assert p.rewrite_ehlo(b"550 5.7.1 go away\r\n", tls_active=True, tls_offered=True,
                          auth_only=False) == b"550 5.7.1 go away\r\n"


@pytest.mark.parametrize(("line", "tls", "out", "rt", "code"), [
    (b"MAIL FROM:<a@b> REQUIRETLS", True, b"MAIL FROM:<a@b>", True, None),
    (b"mail from:<a@b> BODY=8BITMIME requiretls RET=HDRS", True, b"MAIL FROM:<a@b> BODY=8BITMIME RET=HDRS", True,
     None),
    (b"MAIL FROM:<a@b> REQUIRETLS", False, None, False, b"555"),
    (b"MAIL FROM:<a@b> REQUIRETLS=yes", True, None, False, b"501"),
    (b"MAIL FROM:<a@b> REQUIRETLS REQUIRETLS", True, None, False, b"501"),
    (b"MAIL FROM:<a b@c> SIZE=10", True, b"MAIL FROM:<a b@c> SIZE=10", False, None),
    (b"MAIL FROM:<> REQUIRETLS", True, b"MAIL FROM:<>", True, None),
])
def test_mail_from(line: bytes, tls: bool, out: bytes | None, rt: bool, code: bytes | None) -> None:
    m = p.mail_from(p.parse_command(line), tls_active=tls)
    assert m.requiretls is rt
    if code is None:
        assert m.error is None and m.line == out
    else:
        assert m.error is not None and m.error.startswith(code)


def _data(lines: list[bytes]) -> tuple[bytes, int]:
    s = p.DataStream()
    out = b"".join(s.line(ln) for ln in lines)
    assert s.done
    return out, s.dropped


def test_carrier_fields_removed_in_every_disguise() -> None:
    out, dropped = _data([b"Require-TLS-ESMTP: yes", b"Subject: x", b"require-tls-esmtp : yes", b"\tfolded",
                          b".Require-TLS-ESMTP: yes", b"X: y", b" ", b"REQUIRE-TLS-ESMTP:yes", b"", b"body",
                          b"Require-TLS-ESMTP: yes", b"."])
    assert dropped == 4
    assert out == b"Subject: x\r\nX: y\r\n \r\n\r\nbody\r\nRequire-TLS-ESMTP: yes\r\n.\r\n"


def test_header_section_ends_where_postfix_ends_it() -> None:
    out, dropped = _data([b"Subject: x", b"not a header line", b"Require-TLS-ESMTP: yes", b"."])
    assert dropped == 0 and out.endswith(b"Require-TLS-ESMTP: yes\r\n.\r\n")


def test_long_line_without_colon_keeps_header_mode() -> None:
    s = p.DataStream()
    out = s.part(b"A" * 70000, first=True, last=False) + s.part(b"B:c", first=False, last=True)
    out += s.line(b"Require-TLS-ESMTP: yes") + s.line(b".")
    assert s.dropped == 1 and out == b"A" * 70000 + b"B:c\r\n.\r\n"


def test_proxy_v2_header() -> None:
    h = p.proxy_v2(("192.0.2.7", 40000), ("127.0.0.1", 25))
    assert h[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and h[12:14] == b"\x21\x11"
    assert struct.unpack("!H", h[14:16])[0] == 12 and h[16:20] == bytes([192, 0, 2, 7])
    assert struct.unpack("!HH", h[24:28]) == (40000, 25)
    h6 = p.proxy_v2(("::ffff:192.0.2.7", 1), ("::ffff:127.0.0.1", 25))
    assert h6[13] == 0x11
    h6 = p.proxy_v2(("2001:db8::1", 1), ("::1", 25))
    assert h6[13] == 0x21 and struct.unpack("!H", h6[14:16])[0] == 36


# --- the server, against a stand-in for smtpd ------------------------------------------------------------


class FakeSmtpd:
    """Reads the PROXY header, answers like smtpd (EHLO keywords including STARTTLS and CHUNKING, which the
    front must hide) and records every command and message."""

    def __init__(self) -> None:
        self.proxy: list[bytes] = []
        self.commands: list[bytes] = []
        self.messages: list[bytes] = []

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.proxy.append(await r.readexactly(28))
        w.write(b"220 backend ESMTP\r\n")
        while True:
            line = await r.readline()
            if not line:
                break
            self.commands.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                w.write(b"250-backend\r\n250-PIPELINING\r\n250-STARTTLS\r\n250-AUTH PLAIN\r\n250 CHUNKING\r\n")
            elif verb == b"DATA":
                w.write(b"354 go\r\n")
                await w.drain()
                msg = b""
                while (ln := await r.readline()) != b".\r\n":
                    if not ln:
                        return
                    msg += ln
                self.messages.append(msg)
                w.write(b"250 2.0.0 Ok: queued as X\r\n")
            elif verb == b"QUIT":
                w.write(b"221 bye\r\n")
                await w.drain()
                break
            elif verb == b"AUTH":
                w.write(b"334 \r\n")
                await w.drain()
                self.commands.append(await r.readline())
                w.write(b"235 2.7.0 ok\r\n")
            else:
                w.write(b"250 2.1.0 Ok\r\n")
            await w.drain()
        w.close()


@contextlib.contextmanager
def fake_smtpd_thread(path: Path) -> Iterator[FakeSmtpd]:
    """A :class:`FakeSmtpd` listening on the unix socket ``path`` (mode 0666), served by an event loop in a
    thread of its own: for a front that runs as another process."""
    fake = FakeSmtpd()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    path.unlink(missing_ok=True)
    srv = asyncio.run_coroutine_threadsafe(asyncio.start_unix_server(fake.handle, str(path)), loop).result(10)
    os.chmod(path, 0o666)
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(srv.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


async def _bed(auth_only: bool = True, unix: str = "",
               **kw: object) -> tuple[FakeSmtpd, asyncio.Server, asyncio.Server, int]:
    """``unix``: the stand-in listens on that UNIX-domain socket path (else on a loopback port)."""
    fake = FakeSmtpd()
    if unix:
        bs = await asyncio.start_unix_server(fake.handle, unix)
        backend = (unix, 0)
    else:
        bs = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
        backend = ("127.0.0.1", bs.sockets[0].getsockname()[1])
    front = Front(FrontSettings(backend, "front.test", server_context(), auth_only=auth_only,
                                **kw))  # type: ignore[arg-type]
    fs = await front.start("127.0.0.1", 0)
    return fake, bs, fs, fs.sockets[0].getsockname()[1]


class Client:
    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w

    async def reply(self) -> bytes:
        out = b""
        while True:
            ln = await asyncio.wait_for(self.r.readline(), 10)
            out += ln
            if not ln or ln[3:4] != b"-":
                return out

    async def cmd(self, line: bytes) -> bytes:
        self.w.write(line + b"\r\n")
        return await self.reply()

    async def starttls(self) -> None:
        assert (await self.cmd(b"STARTTLS")).startswith(b"220")
        await self.w.start_tls(client_context())


async def _connect(port: int) -> Client:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    c = Client(r, w)
    assert (await c.reply()).startswith(b"220 backend")
    return c


@pytest.mark.parametrize("unix", [False, True], ids=["tcp-backend", "unix-backend"])
def test_requiretls_after_tls_becomes_the_carrier_and_forgeries_go(tmp_path: Path, unix: bool) -> None:
    async def go() -> None:
        fake, bs, fs, port = await _bed(unix=str(tmp_path / "smtpd.sock") if unix else "")
        c = await _connect(port)
        pre = await c.cmd(b"EHLO client.test")
        assert b"STARTTLS" in pre and b"REQUIRETLS" not in pre and b"AUTH" not in pre and b"CHUNKING" not in pre
        assert (await c.cmd(b"MAIL FROM:<a@b.test> REQUIRETLS")).startswith(b"555 5.5.4")
        assert (await c.cmd(b"AUTH PLAIN AGFAYg==")).startswith(b"538")
        await c.starttls()
        post = await c.cmd(b"EHLO client.test")
        assert b"REQUIRETLS" in post and b"AUTH PLAIN" in post and b"STARTTLS" not in post
        assert (await c.cmd(b"MAIL FROM:<a@b.test> REQUIRETLS")).startswith(b"250")
        assert (await c.cmd(b"RCPT TO:<c@d.test>")).startswith(b"250")
        assert (await c.cmd(b"DATA")).startswith(b"354")
        c.w.write(b"Require-TLS-ESMTP: yes\r\nSubject: hi\r\n\r\nbody\n..dot\r\n.\r\n")
        assert (await c.reply()).startswith(b"250 2.0.0")
        # The second message on the session, without REQUIRETLS, gets no carrier: the forged one is removed.
        assert (await c.cmd(b"MAIL FROM:<a@b.test>")).startswith(b"250")
        assert (await c.cmd(b"RCPT TO:<c@d.test>")).startswith(b"250")
        assert (await c.cmd(b"DATA")).startswith(b"354")
        c.w.write(b"Require-TLS-ESMTP: yes\r\nSubject: two\r\n\r\nx\r\n.\r\n")
        assert (await c.reply()).startswith(b"250 2.0.0")
        await c.cmd(b"QUIT")
        bs.close()
        fs.close()
        first, second = fake.messages
        assert first.startswith(b"Received: from client.test ([127.0.0.1]) by front.test (requiretls front) with "
                                b"ESMTPS (using TLSv1.3")
        assert first.count(b"Require-TLS-ESMTP") == 1
        assert first.split(b"\r\n", 2)[1] == b"Require-TLS-ESMTP: yes"
        assert first.endswith(b"Subject: hi\r\n\r\nbody\r\n..dot\r\n")
        assert b"Require-TLS-ESMTP" not in second
        mails = [c for c in fake.commands if c.startswith(b"MAIL")]
        assert mails == [b"MAIL FROM:<a@b.test>\r\n", b"MAIL FROM:<a@b.test>\r\n"]
        assert fake.proxy[0][16:20] == bytes([127, 0, 0, 1])

    asyncio.run(go())


def test_tls_1_2_and_resumed_tls_1_3_sessions_carry_messages() -> None:
    """TLS 1.2 (the step that completes the server's handshake writes its Finished, which the client waits
    for: nothing may hold it back) and TLS 1.3 resuming the session of an earlier connection with its ticket:
    STARTTLS, EHLO, a message and QUIT each, over the front's own TLS."""

    async def go() -> None:
        fake, bs, fs, port = await _bed(auth_only=False)

        def client(ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[str, bool, object]:
            def reply(fh: object) -> bytes:
                while (ln := fh.readline())[3:4] == b"-":  # type: ignore[attr-defined]
                    pass
                return ln  # type: ignore[no-any-return]

            with socket.create_connection(("127.0.0.1", port), 10) as s:
                s.settimeout(10)
                f = s.makefile("rb")
                reply(f)
                s.sendall(b"EHLO c\r\n")
                reply(f)
                s.sendall(b"STARTTLS\r\n")
                assert reply(f).startswith(b"220")
                with ctx.wrap_socket(s, session=session) as t:
                    tf = t.makefile("rb")
                    t.sendall(b"EHLO c\r\n")
                    assert reply(tf).startswith(b"250 REQUIRETLS")
                    for cmd in (b"MAIL FROM:<a@b.test>", b"RCPT TO:<c@d.test>", b"DATA"):
                        t.sendall(cmd + b"\r\n")
                        reply(tf)
                    t.sendall(b"Subject: x\r\n\r\nbody\r\n.\r\n")
                    assert reply(tf).startswith(b"250 2.0.0")
                    t.sendall(b"QUIT\r\n")
                    assert reply(tf).startswith(b"221")
                    return str(t.version()), t.session_reused, t.session

        ctx12, ctx13 = client_context(), client_context()
        ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
        v12 = await asyncio.to_thread(client, ctx12, None)
        first = await asyncio.to_thread(client, ctx13, None)
        again = await asyncio.to_thread(client, ctx13, first[2])  # type: ignore[arg-type]
        bs.close()
        fs.close()
        assert v12[0] == "TLSv1.2"
        assert first[0] == "TLSv1.3" and not first[1]
        assert again[0] == "TLSv1.3" and again[1]
        assert len(fake.messages) == 3
        assert all(m.endswith(b"Subject: x\r\n\r\nbody\r\n") for m in fake.messages)
        assert b"using TLSv1.2 with cipher" in fake.messages[0]

    asyncio.run(go())


def test_smuggled_message_behind_a_bare_lf_dot_stays_inside() -> None:
    """Only CRLF . CRLF after a CRLF line ends the message: what a bare-LF dot hides is content of the one
    message (a sender that took it for content cannot have a second message read out of it)."""

    async def go() -> None:
        fake, bs, fs, port = await _bed(auth_only=False)
        c = await _connect(port)
        await c.cmd(b"EHLO c")
        await c.cmd(b"MAIL FROM:<a@b>")
        await c.cmd(b"RCPT TO:<c@d>")
        assert (await c.cmd(b"DATA")).startswith(b"354")
        c.w.write(b"Subject: one\r\n\r\nx\n.\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@x>\r\nDATA\r\nhi\n.\r\n"
                  b"more\r\n.\n\r\n.\r\n")
        assert (await c.reply()).startswith(b"250")
        assert (await c.cmd(b"QUIT")).startswith(b"221")
        bs.close()
        fs.close()
        assert fake.messages == [b"Subject: one\r\n\r\nx\r\n..\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@x>\r\nDATA\r\n"
                                 b"hi\r\n..\r\nmore\r\n..\r\n\r\n"]
        assert not any(x.startswith(b"MAIL FROM:<evil") for x in fake.commands)

    asyncio.run(go())


def test_plaintext_behind_starttls_drops_the_session() -> None:
    async def go() -> None:
        fake, bs, fs, port = await _bed()
        c = await _connect(port)
        await c.cmd(b"EHLO c")
        c.w.write(b"STARTTLS\r\nMAIL FROM:<x@y>\r\n")
        rep = await c.reply()
        assert rep.startswith(b"554 5.5.1")
        assert await asyncio.wait_for(c.r.read(), 5) == b""
        bs.close()
        fs.close()
        assert not any(x.startswith(b"MAIL") for x in fake.commands)

    asyncio.run(go())


def test_backend_down_is_421_and_long_lines_are_refused() -> None:
    async def go() -> None:
        front = Front(FrontSettings(("127.0.0.1", 1), "f", None))
        fs = await front.start("127.0.0.1", 0)
        r, _w = await asyncio.open_connection("127.0.0.1", fs.sockets[0].getsockname()[1])
        assert (await asyncio.wait_for(r.readline(), 5)).startswith(b"421 4.3.2")
        fs.close()
        fake, bs, fs, port = await _bed()
        c = await _connect(port)
        c.w.write(b"NOOP " + b"x" * 100000 + b"\r\n")
        assert (await c.reply()).startswith(b"500 5.5.2")
        assert (await c.cmd(b"NOOP")).startswith(b"250")
        assert (await c.cmd(b"BDAT 10 LAST")).startswith(b"502")
        bs.close()
        fs.close()
        assert not any(len(x) > 3000 for x in fake.commands)

    asyncio.run(go())


def test_smtpd_that_does_not_answer_the_connect_is_421_after_connect_timeout() -> None:
    """smtpd's listen queue full (the kernel drops the front's SYN): the session's deadline ends the connect
    and the client gets 421, not a hanging session."""
    async def go() -> None:
        backend = socket.socket()
        backend.bind(("127.0.0.1", 0))
        backend.listen(0)
        fillers = []
        for _ in range(3):  # the accept queue holds backlog + 1: later SYNs are dropped
            f = socket.socket()
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect(backend.getsockname())
            fillers.append(f)
        await asyncio.sleep(0.2)
        front = Front(FrontSettings(backend.getsockname(), "f", None, connect_timeout=0.5))
        fs = await front.start("127.0.0.1", 0)
        r, _w = await asyncio.open_connection("127.0.0.1", fs.sockets[0].getsockname()[1])
        started = time.monotonic()
        assert (await asyncio.wait_for(r.readline(), 10)).startswith(b"421 4.3.2")
        assert time.monotonic() - started >= 0.4
        fs.close()
        for f in fillers:
            f.close()
        backend.close()

    asyncio.run(go())


def test_a_busy_unix_smtpd_is_421_after_connect_timeout_then_served(tmp_path: Path) -> None:
    """smtpd on a unix socket with its listen queue full (master.cf's process limit reached): the connect
    fails with EAGAIN, which the front retries until the session's deadline, then 421 (counted as smtpd
    unreachable); once smtpd accepts again, the next client is served."""
    async def go() -> None:
        path = str(tmp_path / "busy.sock")
        backend = socket.socket(socket.AF_UNIX)
        backend.bind(path)
        backend.listen(0)
        fillers = []
        for _ in range(4):  # fill the queue (a unix socket's holds backlog + 1)
            f = socket.socket(socket.AF_UNIX)
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect(path)
            fillers.append(f)
        front = Front(FrontSettings((path, 0), "f", None, connect_timeout=0.5))
        fs = await front.start("127.0.0.1", 0)
        port = fs.sockets[0].getsockname()[1]
        r, _w = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        assert (await asyncio.wait_for(r.readline(), 10)).startswith(b"421 4.3.2")
        assert time.monotonic() - started >= 0.4
        assert front.counters.backend_down == 1
        # smtpd takes connections again: the queue drains and the next session gets its greeting.
        for f in fillers:
            f.close()
        backend.close()
        os.unlink(path)
        fake = FakeSmtpd()
        bs = await asyncio.start_unix_server(fake.handle, path)
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        assert (await asyncio.wait_for(r2.readline(), 10)).startswith(b"220 backend")
        w2.close()
        bs.close()
        fs.close()

    asyncio.run(go())


def test_a_refused_ehlo_keeps_the_transaction_and_its_requiretls(tmp_path: Path) -> None:
    """smtpd refuses a bare EHLO (501) and keeps the transaction open: so does the front, with the REQUIRETLS
    it was given (the message gets the carrier)."""

    async def go() -> None:
        raw, bs, fs, port = await _raw_bed(tmp_path)
        c = await _connect(port)
        await c.cmd(b"EHLO client.test")
        await c.starttls()
        await c.cmd(b"EHLO client.test")
        assert (await c.cmd(b"MAIL FROM:<a@b.test> REQUIRETLS")).startswith(b"250")
        assert (await c.cmd(b"RCPT TO:<c@d.test>")).startswith(b"250")
        assert (await c.cmd(b"EHLO")).startswith(b"501")
        assert (await c.cmd(b"DATA")).startswith(b"354")
        c.w.write(b"Subject: kept\r\n\r\nx\r\n.\r\n")
        assert (await c.reply()).startswith(b"250")
        bs.close()
        fs.close()
        (msg,) = raw.messages
        assert b"\r\nRequire-TLS-ESMTP: yes\r\n" in msg, msg

    asyncio.run(go())


def test_starttls_ends_a_transaction_begun_in_clear(tmp_path: Path) -> None:
    """RFC 3207 §4.2: nothing said before STARTTLS counts.  smtpd is not told of the STARTTLS, so the front
    ends a transaction begun in clear with an RSET of its own: a RCPT right after the handshake finds no MAIL."""

    async def go() -> None:
        raw, bs, fs, port = await _raw_bed(tmp_path)
        c = await _connect(port)
        await c.cmd(b"EHLO client.test")
        assert (await c.cmd(b"MAIL FROM:<a@b.test>")).startswith(b"250")
        await c.starttls()
        assert (await c.cmd(b"RCPT TO:<c@d.test>")).startswith(b"503")
        bs.close()
        fs.close()
        assert b"RSET\r\n" in raw.chunks, raw.chunks

    asyncio.run(go())


def test_slow_client_is_cut_off_and_others_are_served() -> None:
    async def go() -> None:
        _fake, bs, fs, port = await _bed(line_deadline=1.0)
        slow = await _connect(port)
        for _ in range(4):
            slow.w.write(b"N")
            await asyncio.sleep(0.4)
        # Cut off after line_deadline although it never stopped sending.
        assert await asyncio.wait_for(slow.r.read(), 5) == b""
        ok = await _connect(port)
        assert (await ok.cmd(b"NOOP")).startswith(b"250")
        bs.close()
        fs.close()

    asyncio.run(go())


def test_connection_limit() -> None:
    async def go() -> None:
        _fake, bs, fs, port = await _bed(max_connections=2)
        a = await _connect(port)
        b = await _connect(port)
        r, _w = await asyncio.open_connection("127.0.0.1", port)
        assert (await asyncio.wait_for(r.readline(), 5)).startswith(b"421 4.3.2")
        await a.cmd(b"QUIT")
        await asyncio.sleep(0.2)
        c = await _connect(port)
        assert (await c.cmd(b"NOOP")).startswith(b"250")
        del b
        bs.close()
        fs.close()

    asyncio.run(go())


_ = ssl


def test_two_thousand_idle_connections_are_held_and_others_still_served() -> None:
    """2,000 clients that connect and say nothing: each has its session (and its smtpd connection); the next
    one beyond the limit gets 421 at once; a working client is served meanwhile."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 10000
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))

    async def go() -> None:
        _fake, bs, fs, port = await _bed(max_connections=2001)
        idle = []
        for _ in range(2000):
            idle.append(await asyncio.open_connection("127.0.0.1", port))
        ok = await _connect(port)
        assert (await ok.cmd(b"NOOP")).startswith(b"250")
        r, _w = await asyncio.open_connection("127.0.0.1", port)
        assert (await asyncio.wait_for(r.readline(), 10)).startswith(b"421 4.3.2")
        for _r, w in idle:
            w.close()
        await ok.cmd(b"QUIT")
        bs.close()
        fs.close()

    try:
        asyncio.run(go())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class RawSmtpd:
    """An smtpd stand-in that records what each read brought (what the front wrote at once), keeps MAIL/RCPT
    state as smtpd does (503 out of order), refuses RCPT to ``bad@`` and answers RCPT to ``drop@`` with 421 and
    hangs up."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.messages: list[bytes] = []

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        hdr = await r.readexactly(16)
        await r.readexactly(int.from_bytes(hdr[14:16], "big"))
        w.write(b"220 backend ESMTP\r\n")
        buf, mail, rcpts = b"", False, 0
        while data := await r.read(65536):
            self.chunks.append(data)
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                verb = line[:4].upper()
                if verb == b"EHLO" and not line[4:].strip():
                    w.write(b"501 5.5.4 Syntax: EHLO hostname\r\n")  # as smtpd: the transaction stays
                elif verb == b"EHLO":
                    mail, rcpts = False, 0
                    w.write(b"250-backend\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    mail, rcpts = True, 0
                    w.write(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT" and not mail:
                    w.write(b"503 5.5.1 Error: need MAIL command\r\n")
                elif verb == b"RCPT" and b"<bad@" in line:
                    w.write(b"550 5.1.1 <bad@d.test>: Recipient address rejected\r\n")
                elif verb == b"RCPT" and b"<drop@" in line:
                    w.write(b"421 4.3.0 closing\r\n")
                    await w.drain()
                    w.close()
                    return
                elif verb == b"RCPT":
                    rcpts += 1
                    w.write(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA" and not rcpts:
                    w.write(b"554 5.5.1 Error: no valid recipients\r\n")
                elif verb == b"DATA":
                    w.write(b"354 go\r\n")
                    await w.drain()
                    while b"\r\n.\r\n" not in b"\r\n" + buf:
                        buf += await r.read(65536)
                    end = (b"\r\n" + buf).index(b"\r\n.\r\n")
                    self.messages.append(buf[:end])
                    buf = buf[end + 3:]
                    mail, rcpts = False, 0
                    w.write(b"250 2.0.0 Ok: queued as Y\r\n")
                elif verb == b"RSET":
                    mail, rcpts = False, 0
                    w.write(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    w.write(b"221 2.0.0 Bye\r\n")
                    await w.drain()
                    w.close()
                    return
                else:
                    w.write(b"250 2.0.0 Ok\r\n")
            await w.drain()
        w.close()


async def _raw_bed(tmp_path: Path) -> tuple[RawSmtpd, asyncio.Server, asyncio.Server, int]:
    raw = RawSmtpd()
    sock = str(tmp_path / "raw.sock")
    bs = await asyncio.start_unix_server(raw.handle, sock)
    fs = await Front(FrontSettings((sock, 0), "front.test", server_context())).start("127.0.0.1", 0)
    return raw, bs, fs, fs.sockets[0].getsockname()[1]


async def _replies(c: Client, n: int) -> list[bytes]:
    return [await c.reply() for _ in range(n)]


def test_a_pipelined_group_goes_to_smtpd_in_one_write_and_the_replies_keep_their_order(tmp_path: Path) -> None:
    """RFC 2920 through the front: MAIL (with REQUIRETLS, taken out), RCPTs and DATA the client pipelined
    reach smtpd in one write; the client gets smtpd's replies in order (a refused recipient among them), and
    the message the REQUIRETLS carrier."""

    async def go() -> None:
        raw, bs, fs, port = await _raw_bed(tmp_path)
        c = await _connect(port)
        await c.cmd(b"EHLO client.test")
        await c.starttls()
        assert b"PIPELINING" in await c.cmd(b"EHLO client.test")
        c.w.write(b"MAIL FROM:<a@b.test> REQUIRETLS\r\nRCPT TO:<c@d.test>\r\nRCPT TO:<bad@d.test>\r\n"
                  b"RCPT TO:<e@d.test>\r\nDATA\r\n")
        got = await _replies(c, 5)
        assert [r[:3] for r in got] == [b"250", b"250", b"550", b"250", b"354"], got
        c.w.write(b"Subject: grouped\r\n\r\nbody\r\n.\r\n")
        assert (await c.reply()).startswith(b"250 2.0.0")
        # Another group without DATA (RSET, MAIL), then a lone command: each group in order.
        c.w.write(b"RSET\r\nMAIL FROM:<x@b.test>\r\n")
        assert [r[:3] for r in await _replies(c, 2)] == [b"250", b"250"]
        assert (await c.cmd(b"QUIT")).startswith(b"221")
        bs.close()
        fs.close()
        assert b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nRCPT TO:<bad@d.test>\r\nRCPT TO:<e@d.test>\r\n" \
               b"DATA\r\n" in raw.chunks, raw.chunks
        assert b"RSET\r\nMAIL FROM:<x@b.test>\r\n" in raw.chunks, raw.chunks
        (msg,) = raw.messages
        assert msg.split(b"\r\n")[1] == b"Require-TLS-ESMTP: yes" and msg.endswith(b"Subject: grouped\r\n\r\nbody\r\n")

    asyncio.run(go())


def test_a_group_stops_where_the_front_answers_itself(tmp_path: Path) -> None:
    """In clear, MAIL ... REQUIRETLS is the front's to refuse (555): it is answered in its place in the order,
    smtpd never sees it, and what follows goes to smtpd (which refuses RCPT and DATA without MAIL)."""

    async def go() -> None:
        raw, bs, fs, port = await _raw_bed(tmp_path)
        c = await _connect(port)
        await c.cmd(b"EHLO client.test")
        c.w.write(b"MAIL FROM:<ok@b.test>\r\nRSET\r\nMAIL FROM:<a@b.test> REQUIRETLS\r\nRCPT TO:<c@d.test>\r\n"
                  b"DATA\r\n")
        got = await _replies(c, 5)
        assert [r[:3] for r in got] == [b"250", b"250", b"555", b"503", b"554"], got
        assert (await c.cmd(b"QUIT")).startswith(b"221")
        bs.close()
        fs.close()
        assert not any(b"REQUIRETLS" in ch or b"<a@b.test>" in ch for ch in raw.chunks), raw.chunks
        assert b"MAIL FROM:<ok@b.test>\r\nRSET\r\n" in raw.chunks

    asyncio.run(go())


def test_smtpd_closing_in_a_group_gets_its_421_to_the_client(tmp_path: Path) -> None:
    async def go() -> None:
        raw, bs, fs, port = await _raw_bed(tmp_path)
        c = await _connect(port)
        await c.cmd(b"EHLO client.test")
        c.w.write(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<drop@d.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
        got = await _replies(c, 2)
        assert [r[:3] for r in got] == [b"250", b"421"], got
        assert await asyncio.wait_for(c.r.read(), 10) == b""  # and the session ends
        bs.close()
        fs.close()
        assert raw.chunks[-1] == b"MAIL FROM:<a@b.test>\r\nRCPT TO:<drop@d.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"

    asyncio.run(go())
