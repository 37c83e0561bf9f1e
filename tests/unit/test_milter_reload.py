"""SIGHUP on the real milter process (pymilter on libmilter): the table is reloaded, the process and its
connections live on.  libmilter itself takes SIGHUP as *stop*; see requiretls.daemon.run_blocking_server.

The MTA side is a minimal milter protocol client (version 6 packets: 4-byte length, command, data), enough to
negotiate and run one message to end-of-message on a connection.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# SMFIP_NR_*: the milter asks the MTA not to wait for a reply to these steps.
_NO_REPLY = {b"C": 0x1000, b"M": 0x4000, b"R": 0x8000, b"L": 0x80}


class MilterClient:
    """The MTA end of one milter connection."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self._send(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF))  # offer every action and protocol step
        cmd, data = self._recv()
        assert cmd == b"O", (cmd, data)
        self.protocol = struct.unpack(">III", data[:12])[2]

    def _send(self, cmd: bytes, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">I", len(data) + 1) + cmd + data)

    def _recv(self) -> tuple[bytes, bytes]:
        head = self._exact(4)
        body = self._exact(struct.unpack(">I", head)[0])
        return body[:1], body[1:]

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the milter closed the connection")
            buf += chunk
        return buf

    def step(self, cmd: bytes, *fields: str) -> None:
        """One step the milter negotiated not to answer, or that it answers with 'continue'."""
        self._send(cmd, b"".join(f.encode() + b"\0" for f in fields))
        if not self.protocol & _NO_REPLY.get(cmd, 0):
            reply, _ = self._recv()
            assert reply == b"c", reply

    def connect(self) -> None:
        self._send(b"D", b"C" + b"v\0Postfix 3.7.11\0")  # macros of the connect step
        self._send(b"C", b"client.test\0" + b"4" + struct.pack(">H", 2525) + b"127.0.0.1\0")
        if not self.protocol & _NO_REPLY[b"C"]:
            assert self._recv()[0] == b"c"

    def message(self, sender: str, rcpt: str) -> list[tuple[bytes, bytes]]:
        """Envelope, one header and end-of-message; the milter's replies to end-of-message (edits, then the
        verdict)."""
        self.step(b"M", f"<{sender}>")
        self.step(b"R", f"<{rcpt}>")
        self.step(b"L", "Subject", "hello")
        self._send(b"D", b"E" + b"i\0QID123\0")
        self._send(b"E")
        replies = []
        while True:
            cmd, data = self._recv()
            replies.append((cmd, data))
            if cmd in (b"a", b"c", b"r", b"t", b"y", b"d"):
                return replies

    def close(self) -> None:
        self._send(b"Q")
        self.sock.close()


@pytest.fixture
def policy_extra() -> str:
    """Extra ``[policy]`` lines for the milter's configuration."""
    return ""


@pytest.fixture
def milter(tmp_path: Path, policy_extra: str) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    (tmp_path / "policy").write_text("old.example requiretls=yes\n")
    (tmp_path / "senders").write_text("")
    sock = tmp_path / "run" / "milter.sock"
    cfg = tmp_path / "requiretls.toml"
    cfg.write_text(f'[policy]\ntable = "policy"\nsender_table = "senders"\n{policy_extra}\n'
                   # Nothing answers at 127.0.0.1:9: keep the pre-flight's wait for it short.
                   f'[dns]\nresolver = "127.0.0.1:9"\ntimeout = 1\n[milter]\nsocket = "unix:{sock}"\n'
                   f'socket_group = ""\npreflight_timeout = 2\n')
    logf = tmp_path / "milter.log"
    with open(logf, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "requiretls", "milter", "--config", str(cfg)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        end = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < end, logf.read_text()
            time.sleep(0.05)
        yield proc, sock, logf
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)


def _route(replies: list[tuple[bytes, bytes]]) -> str | None:
    """The route header the milter added at end-of-message, if any."""
    for cmd, data in replies:
        if cmd == b"h":
            name, value = data.split(b"\0")[:2]
            if name == b"X-RequireTLS-Route":
                return value.decode()
    return None


def _wait_log(logf: Path, text: str, count: int = 1, timeout: float = 10) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        log = logf.read_text()
        if log.count(text) >= count:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} x{count} not logged:\n{logf.read_text()}")


def test_sighup_reloads_the_table_and_connections_open_across_it_get_the_new_one(
        milter: tuple[subprocess.Popen[bytes], Path, Path], tmp_path: Path) -> None:
    proc, sock, logf = milter
    before = MilterClient(str(sock))
    before.connect()
    assert _route(before.message("a@sender.test", "bob@new.example")) is None  # not in the table yet
    held = MilterClient(str(sock))  # opened before the reload, used after it
    held.connect()

    (tmp_path / "policy").write_text("old.example requiretls=yes\nnew.example requiretls=yes\n")
    for _ in range(20):  # repeated, as an impatient admin would: each one a reload, none a stop
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(0.02)
    log = _wait_log(logf, "reload=done, table_entries=2, sender_entries=0", 1)
    assert "reload=failed" not in log and "milter stopped" not in log
    time.sleep(1)  # libmilter stops within a second or so of taking a SIGHUP itself: give it the chance
    assert proc.poll() is None, logf.read_text()

    assert _route(held.message("a@sender.test", "bob@new.example")) == "relay"
    assert _route(before.message("a@sender.test", "bob@new.example")) == "relay"
    fresh = MilterClient(str(sock))
    fresh.connect()
    assert _route(fresh.message("a@sender.test", "bob@new.example")) == "relay"
    for c in (before, held, fresh):
        c.close()
    assert f"requiretls/milter[{proc.pid}]: reload=done" in logf.read_text()


def test_bad_table_at_sighup_keeps_the_old_one_and_the_milter_serving(
        milter: tuple[subprocess.Popen[bytes], Path, Path], tmp_path: Path) -> None:
    proc, sock, logf = milter
    (tmp_path / "policy").write_text("new.example requiretls=yes\nbroken.example nonsense\n")
    os.kill(proc.pid, signal.SIGHUP)
    log = _wait_log(logf, 'reload="failed, keeping the old configuration"')
    assert f"{tmp_path}/policy:2: broken.example: unknown TLS security level 'nonsense'" in log
    c = MilterClient(str(sock))
    c.connect()
    assert _route(c.message("a@sender.test", "bob@old.example")) == "relay"  # the old table still rules
    assert _route(c.message("a@sender.test", "bob@new.example")) is None
    c.close()
    assert proc.poll() is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_still_stops_the_milter_and_at_once(milter: tuple[subprocess.Popen[bytes], Path, Path],
                                                    sig: signal.Signals) -> None:
    """libmilter alone notices a stop only when its listener's 5-second poll ends (every stop or restart of the
    milter took up to 5 s); the milter wakes the listener, so it is gone well within that."""
    proc, sock, logf = milter
    c = MilterClient(str(sock))  # a session open across the stop does not hold it up
    c.connect()
    started = time.monotonic()
    proc.send_signal(sig)
    assert proc.wait(15) == 0
    took = time.monotonic() - started
    with contextlib.suppress(OSError):  # the milter is gone: its end of the session is closed
        c.close()
    assert "milter stopped" in logf.read_text()
    assert took < 3.0, f"the milter took {took:.1f}s to stop"


@pytest.mark.parametrize("policy_extra", ['preflight = "warn"'])
def test_with_preflight_on_sighup_reloads_and_sigterm_still_stops_cleanly(
        milter: tuple[subprocess.Popen[bytes], Path, Path], tmp_path: Path) -> None:
    """The pre-flight runs its own thread, started before libmilter's: neither signal may land there (SIGTERM
    used to, and killed the process on the spot, exit status 143, without libmilter's orderly stop)."""
    proc, sock, logf = milter
    os.kill(proc.pid, signal.SIGHUP)
    log = _wait_log(logf, "reload=done")
    assert "reload=done, table_entries=1" in log
    c = MilterClient(str(sock))
    c.connect()
    assert _route(c.message("a@sender.test", "bob@old.example")) == "relay"
    c.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert "milter stopped" in logf.read_text()
