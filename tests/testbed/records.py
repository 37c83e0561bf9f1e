"""Reading what the test MX servers recorded (``<state>/mx/<key>/``), from any process."""

from __future__ import annotations

import email
import email.message
import email.policy
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from .hosts import MX_BY_KEY, MxHost

FAULT_FILE = "data-cut.fault"
"""The data-cut switch of an MX (read by the services process at every DATA); not ``*.json``, which are
deliveries."""
CUTS_FILE = "cuts.jsonl"
#: The MTA-STS stall fault: the domains (one a line) whose policy requests the HTTPS server holds unanswered,
#: under ``STATE/https/`` (``Bed.sts_stall``); a request is held at most STALL_MAX seconds.
STALL_FILE = "stall.fault"
STALL_MAX = 120.0
"""One line per DATA transaction the MX cut."""


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
class CutRule:
    """A data-cut fault: the MX answers DATA with 354, reads ``after_bytes`` of the message (never the final
    dot), then resets the TCP connection (RST) without a reply and records no delivery.  It does so for every
    ``every``-th DATA transaction from clients whose EHLO/HELO name is ``helo`` (any if None), with
    ``min_size`` whose MAIL FROM announced SIZE >= min_size, with ``rcpt_prefix`` that have a recipient whose
    local part starts with it, ``count`` times."""

    count: int
    every: int = 1
    helo: str | None = None
    min_size: int | None = None
    rcpt_prefix: str | None = None
    after_bytes: int = 1024


@dataclass(frozen=True)
class Cut:
    """One DATA transaction an MX cut (see CutRule)."""

    at: str
    mx: str
    rule: int
    peer: str
    helo: str | None
    tls: bool
    tls_version: str | None
    tls_cipher: str | None
    mail_from: str
    rcpt_tos: tuple[str, ...]
    size: int | None  # the SIZE= of MAIL FROM, if any
    bytes_read: int
    dot_seen: bool
    partial: bytes  # what the MX read of the message before cutting


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

    def cut_data(self, *rules: CutRule) -> None:
        """Arm the data-cut fault with these rules (fresh counters); no rules disarms it.  Takes effect at the
        next DATA command the MX receives."""
        path = self.directory / FAULT_FILE
        if not rules:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"id": uuid.uuid4().hex, "rules": [asdict(r) for r in rules]}))
        os.replace(tmp, path)

    def cuts(self) -> list[Cut]:
        f = self.directory / CUTS_FILE
        if not f.exists():
            return []
        out = []
        for line in f.read_text().splitlines():
            r = json.loads(line)
            r["rcpt_tos"] = tuple(r["rcpt_tos"])
            r["partial"] = r["partial"].encode("latin-1")
            out.append(Cut(**r))
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
