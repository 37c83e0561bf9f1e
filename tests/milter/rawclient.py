"""A raw milter-protocol client (the MTA side, protocol version 6), for what miltertest cannot send: requests
larger than its own buffer.  Offers every no-reply step as Postfix does and expects a reply only where the
milter asked for one."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

NR_BITS = {b"C": 0x1000, b"M": 0x4000, b"R": 0x8000, b"L": 0x80, b"N": 0x40000, b"B": 0x80000}
NO_BITS = {b"N": 0x40, b"B": 0x10}  # SMFIP_NOEOH, SMFIP_NOBODY


@dataclass
class Eom:
    final: bytes  # a accept, t tempfail, r reject, y reply code, ...
    edits: list[tuple[bytes, bytes]] = field(default_factory=list)


class RawMilter:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.proto = 0

    def close(self) -> None:
        self.s.close()

    def _send(self, cmd: bytes, data: bytes = b"") -> None:
        self.s.sendall(struct.pack(">I", len(data) + 1) + cmd + data)

    def _recv(self) -> tuple[bytes, bytes]:
        head = self._exact(4)
        (n,) = struct.unpack(">I", head)
        body = self._exact(n)
        return body[:1], body[1:]

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("milter closed the connection")
            buf += chunk
        return buf

    def negotiate(self) -> None:
        self._send(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF))
        cmd, data = self._recv()
        assert cmd == b"O", cmd
        _, _, self.proto = struct.unpack(">III", data[:12])

    def _step(self, cmd: bytes, data: bytes) -> bytes | None:
        if cmd in NO_BITS and self.proto & NO_BITS[cmd]:
            return None
        self._send(cmd, data)
        if cmd in NR_BITS and self.proto & NR_BITS[cmd]:
            return None
        return self._recv()[0]

    def macro(self, stage: bytes, **values: str | bytes) -> None:
        data = b"".join(k.encode() + b"\0" + (v if isinstance(v, bytes) else v.encode()) + b"\0"
                        for k, v in values.items())
        self._send(b"D", stage + data)

    def connect(self, host: bytes = b"client.test", ip: bytes = b"192.0.2.7") -> bytes | None:
        return self._step(b"C", host + b"\0" + b"4" + struct.pack(">H", 25) + ip + b"\0")

    def mail(self, sender: bytes, *params: bytes) -> bytes | None:
        return self._step(b"M", b"".join(a + b"\0" for a in (sender, *params)))

    def rcpt(self, rcpt: bytes) -> bytes | None:
        return self._step(b"R", rcpt + b"\0")

    def header(self, name: bytes, value: bytes) -> bytes | None:
        return self._step(b"L", name + b"\0" + value + b"\0")

    def eom(self) -> Eom:
        self._step(b"N", b"")
        self._step(b"B", b"body\r\n")
        self._send(b"E")
        out = Eom(b"")
        while True:
            cmd, data = self._recv()
            if cmd in (b"h", b"m", b"e", b"i", b"+", b"-"):
                out.edits.append((cmd, data))
                continue
            out.final = cmd
            return out
