"""Reading what the test MX servers recorded (``<state>/mx/<key>/``), from any process."""

from __future__ import annotations

import email
import email.message
import email.policy
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .hosts import MX_BY_KEY, MxHost


@dataclass(frozen=True)
class Delivery:
    """One message an MX accepted: the envelope as sent on the wire, the TLS facts, the raw message."""

    mx: str
    received_at: str
    peer: str
    helo: str | None
    tls: bool
    tls_version: str | None
    tls_cipher: str | None
    mail_from: str
    mail_options: tuple[str, ...]
    rcpt_tos: tuple[str, ...]
    rcpt_options: tuple[str, ...]
    raw: bytes

    @property
    def requiretls(self) -> bool:
        """True if MAIL FROM carried the REQUIRETLS parameter (RFC 8689 section 4.1)."""
        return any(o.upper() == "REQUIRETLS" for o in self.mail_options)

    @property
    def message(self) -> email.message.EmailMessage:
        msg = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg

    def header(self, name: str) -> list[str]:
        return [str(v) for v in (self.message.get_all(name) or [])]


@dataclass(frozen=True)
class Connection:
    """One SMTP connection to an MX, delivered or not (written when it closes)."""

    at: str
    peer: str
    tls: bool
    tls_version: str | None
    commands: tuple[str, ...]
    delivered: int


@dataclass(frozen=True)
class MxRecorder:
    """Read/clear access to one MX's records."""

    host: MxHost
    directory: Path

    def deliveries(self) -> list[Delivery]:
        out = []
        for j in sorted(self.directory.glob("*.json")):
            rec = json.loads(j.read_text())
            out.append(
                Delivery(
                    mx=rec["mx"],
                    received_at=rec["received_at"],
                    peer=rec["peer"],
                    helo=rec["helo"],
                    tls=rec["tls"],
                    tls_version=rec["tls_version"],
                    tls_cipher=rec["tls_cipher"],
                    mail_from=rec["mail_from"],
                    mail_options=tuple(rec["mail_options"]),
                    rcpt_tos=tuple(rec["rcpt_tos"]),
                    rcpt_options=tuple(rec["rcpt_options"]),
                    raw=(self.directory / rec["eml"]).read_bytes(),
                )
            )
        return out

    def connections(self) -> list[Connection]:
        f = self.directory / "connections.jsonl"
        if not f.exists():
            return []
        out = []
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out.append(
                Connection(
                    r["at"], r["peer"], r["tls"], r["tls_version"], tuple(r["commands"]), r["delivered"]
                )
            )
        return out

    def clear(self) -> None:
        for p in self.directory.glob("*"):
            if p.is_file():
                p.unlink()

    def wait_for(self, count: int = 1, timeout: float = 30.0) -> list[Delivery]:
        """Wait until at least ``count`` deliveries are recorded; raise TimeoutError otherwise."""
        end = time.monotonic() + timeout
        while True:
            got = self.deliveries()
            if len(got) >= count:
                return got
            if time.monotonic() > end:
                raise TimeoutError(f"MX {self.host.key}: {len(got)} of {count} deliveries after {timeout}s")
            time.sleep(0.1)


def recorder(state: Path, key: str) -> MxRecorder:
    return MxRecorder(MX_BY_KEY[key], state / "mx" / key)
