"""Large messages through the agent with bounded memory: the LMTP DATA spooled to a file above the threshold,
sent on in chunks with the same dot-stuffing as smtplib's ``data()``."""

from __future__ import annotations

import asyncio
import os
import smtplib
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from requiretls.relay import agent
from requiretls.relay.deliver import DeliveryStatus, Outcome
from requiretls.relay.spool import SPOOL_PREFIX, Message, SpoolWriter, prepare_spool_dir, send_data


def _message(body_lines: int) -> bytes:
    head = b"From: a@s.example\r\nTo: b@x.example\r\nSubject: big\r\n\r\n"
    return head + b"".join(b"line %08d ..dots. and 8-bit \xc3\xa4\r\n" % i for i in range(body_lines))


def test_small_message_stays_in_memory(tmp_path: Path) -> None:
    w = SpoolWriter(str(tmp_path), threshold=1000)
    w.write(b"Subject: x\r\n\r\nbody\r\n")
    m = w.finish()
    assert not m.spooled and m.read() == b"Subject: x\r\n\r\nbody\r\n"


def test_large_message_body_goes_to_an_unlinked_file(tmp_path: Path) -> None:
    data = _message(5000)
    w = SpoolWriter(str(tmp_path), threshold=10_000)
    seen_files = []
    for i in range(0, len(data), 777):
        w.write(data[i : i + 777])
        seen_files += os.listdir(tmp_path)
    m = w.finish()
    assert m.spooled and m.size == len(data)
    assert m.head == b"From: a@s.example\r\nTo: b@x.example\r\nSubject: big\r\n\r\n"  # header section only
    assert m.read() == data and b"".join(m.chunks(4096)) == data
    assert seen_files == [] and os.listdir(tmp_path) == []  # never visible by name
    assert m.has_8bit() and not Message(b"x" * 10).has_8bit()
    assert m.spool is not None
    fd = m.spool.fd
    assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
    m.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_header_rewrite_keeps_the_spooled_body(tmp_path: Path) -> None:
    data = b"X-RequireTLS-Route: relay\r\nSubject: s\r\n\r\n" + b"b" * 50_000 + b"\r\n"
    w = SpoolWriter(str(tmp_path), threshold=1000)
    w.write(data)
    m = w.finish().with_head(agent.strip_private)
    assert m.spooled and m.read() == agent.strip_private(data)


def test_leftovers_removed_at_start(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    assert prepare_spool_dir(str(d)) == 0
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    (d / f"{SPOOL_PREFIX}abc").write_bytes(b"old")
    (d / "keep.txt").write_bytes(b"not ours")
    assert prepare_spool_dir(str(d)) == 1
    assert os.listdir(d) == ["keep.txt"]


class _Capture:
    sock = None

    def __init__(self) -> None:
        self.sent = b""

    def docmd(self, cmd: str) -> tuple[int, bytes]:
        assert cmd == "data"
        return 354, b"go ahead"

    def send(self, data: bytes) -> None:
        self.sent += data

    def getreply(self) -> tuple[int, bytes]:
        return 250, b"ok"


def _smtplib_data(msg: bytes) -> bytes:
    """What smtplib.SMTP.data() puts on the wire for ``msg``."""
    q = smtplib._quote_periods(msg)  # type: ignore[attr-defined]
    if q[-2:] != b"\r\n":
        q += b"\r\n"
    return q + b".\r\n"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b".", b"\r\n", b"\n", b"a", b"..", b"\r", b"\xff"]), max_size=40),
       st.integers(1, 7))
def test_send_data_matches_smtplib(parts: list[bytes], chunk: int) -> None:
    raw = b"".join(parts)
    c = _Capture()
    w = SpoolWriter(None, threshold=0)  # spools as soon as a header/body boundary is seen
    w.write(raw)
    m = w.finish()
    try:
        original = Message.chunks
        Message.chunks = lambda self, size=chunk: original(self, size)  # type: ignore[method-assign]
        assert send_data(c, m) == (250, b"ok")  # type: ignore[arg-type]
    finally:
        Message.chunks = original  # type: ignore[method-assign]
        m.close()
    assert c.sent == _smtplib_data(raw)


@pytest.fixture
def lmtp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, list[tuple[bool, bytes]], Path]]:
    """The agent's LMTP server on a loopback port with a spool directory; yields (port, what the delivery
    function got: (spooled, bytes), spool dir)."""
    got: list[tuple[bool, bytes]] = []

    def record(*args: object) -> dict[str, Outcome]:
        rcpts, message = args[2], args[3]
        assert isinstance(rcpts, list) and isinstance(message, Message)
        got.append((message.spooled, message.read()))
        return dict.fromkeys(rcpts, Outcome(DeliveryStatus.SENT, 250, "2.0.0", "ok"))

    monkeypatch.setattr(agent, "deliver_requiretls", record)

    class _Resolver:
        async def lookup(self, domain: str) -> object:
            return object()

    spool = tmp_path / "spool"
    prepare_spool_dir(str(spool))
    handler = agent.AgentHandler(_Resolver(), agent.AgentState(  # type: ignore[arg-type]
        agent.AgentSettings(spool_dir=str(spool), spool_threshold=100_000)))
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = loop.run_until_complete(loop.create_server(
        lambda: agent.AgentLMTP(handler, enable_SMTPUTF8=True, decode_data=False, ident="t", data_size_limit=0),
        sock=sock))
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        yield port, got, spool
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)


def _lmtp_send(port: int, data: bytes) -> bytes:
    with smtplib.LMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo()
        c.mail("a@s.example")
        c.rcpt("b@x.example")
        code, msg = c.data(data)
        return b"%d %s" % (code, msg)


def test_lmtp_data_spooled_and_delivered_whole(lmtp: tuple[int, list[tuple[bool, bytes]], Path]) -> None:
    port, got, spool = lmtp
    data = b"X-RequireTLS-Route: relay\r\n" + _message(20_000) + b".leading dot\r\n"
    assert len(data) > 500_000
    reply = _lmtp_send(port, data)
    assert reply.startswith(b"250 2.0.0"), reply
    assert got == [(True, agent.strip_private(data))]  # every byte, dots unstuffed, private field gone
    assert os.listdir(spool) == []
    assert _lmtp_send(port, b"Subject: x\r\n\r\nsmall\r\n").startswith(b"250")
    assert got[1] == (False, b"Subject: x\r\n\r\nsmall\r\n")


def test_lmtp_over_long_line_refused_and_nothing_left(lmtp: tuple[int, list[tuple[bool, bytes]], Path]) -> None:
    port, got, spool = lmtp
    reply = _lmtp_send(port, b"Subject: x\r\n\r\n" + b"y" * 200_000 + b"\r\nend\r\n" + b"z" * 200_000 + b"\r\n")
    assert reply.startswith(b"500"), reply
    assert got == [] and os.listdir(spool) == []
    assert _lmtp_send(port, b"Subject: x\r\n\r\nok\r\n").startswith(b"250")
    assert got == [(False, b"Subject: x\r\n\r\nok\r\n")]


def test_connection_lost_during_data_delivers_nothing(lmtp: tuple[int, list[tuple[bool, bytes]], Path]) -> None:
    import time

    port, got, spool = lmtp
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"LHLO c.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        for cmd in (b"MAIL FROM:<a@s.example>", b"RCPT TO:<b@x.example>", b"DATA"):
            s.sendall(cmd + b"\r\n")
            f.readline()
        s.sendall(b"Subject: cut\r\n\r\n" + b"z" * 70 + b"\r\n" * 1000 + b"y" * 200_000)  # spooled, no final dot
        f.close()
    time.sleep(0.5)
    assert got == [] and os.listdir(spool) == []
