"""``requiretls notify``: tell local and authenticated senders, once per message, that TLS policy holds their
mail, and how to opt out.  Run by ``requiretls-notify.timer`` (one pass per run; no daemon).

Who is told: a sender whose domain is one of this host's (``notify.sender_domains``, else Postfix's
mydestination and virtual domains), so the notice stays here; or, with ``notify.notify_authenticated``, a sender
who submitted the message with SASL authentication (Postfix keeps the login in the queue file).  Nobody else:
the notifier must never send backscatter to a forged outside address.  Never the null sender.

Never twice: a message (queue id + arrival time) is recorded in ``STATE_DIR/notified.json`` *before* its notice
is sent, and the record is removed again only when the submission failed cleanly (refused, or no connection).
A run killed between recording and sending therefore sends no notice for that message rather than two; such
records are kept with ``state: sending`` and logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import smtplib
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, formatdate, make_msgid
from typing import Any

from requiretls.addresses import Endpoint
from requiretls.log import kv
from requiretls.notify.queue import OptoutVerdict, TlsDeferred, verdict_text
from requiretls.policy.table import split_address

log = logging.getLogger("requiretls")

STATE_FILE = "notified.json"
#: records of messages that left the queue are dropped after this long
_KEEP_SECONDS = 14 * 86400


def message_key(e: TlsDeferred) -> str:
    """Queue ids are reused over time; with the arrival time they name one message."""
    return f"{e.queue_id}:{e.arrival_time}"


class NotifyState:
    """The record of notified messages: a JSON file replaced atomically (write, fsync, rename), with an exclusive
    lock so that two runs never overlap."""

    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        self.path = os.path.join(state_dir, STATE_FILE)
        self.records: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def locked(self) -> Iterator[NotifyState]:
        os.makedirs(self.dir, mode=0o750, exist_ok=True)
        with open(os.path.join(self.dir, "notify.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.records = self._read()
            yield self

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # A damaged record must not turn into a second notice for everything: stop and say so.
            raise RuntimeError(f"{self.path}: cannot read the record of notified messages: {e}; fix or move it "
                               "away (every message in the queue would then be notified again)") from e
        if not isinstance(data, dict) or not isinstance(data.get("notified"), dict):
            raise RuntimeError(f"{self.path}: not a record of notified messages")
        return dict(data["notified"])

    def save(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".notified.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "notified": self.records}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def prune(self, present: set[str], now: float) -> None:
        for key in [k for k, r in self.records.items() if k not in present
                    and now - float(r.get("at", now)) > _KEEP_SECONDS]:
            del self.records[key]


def eligible_sender(e: TlsDeferred, local_domains: frozenset[str], notify_authenticated: bool) -> str | None:
    """Why the sender may be told (None: not at all)."""
    if not e.sender or e.sender == "<>":
        return None
    domain = split_address(e.sender)[1].lower().rstrip(".")
    if domain and domain in local_domains:
        return f"local sender domain {domain}"
    if notify_authenticated and e.sasl_username:
        return f"SASL-authenticated as {e.sasl_username}"
    return None


@dataclass(frozen=True, slots=True)
class NoticeText:
    optout_cookie: str
    myhostname: str
    from_address: str


def _hours(seconds: float) -> str:
    h = seconds / 3600
    return f"{h:.0f} hour{'s' if round(h) != 1 else ''}" if h >= 1 else f"{max(1, round(seconds / 60))} minutes"


def compose(e: TlsDeferred, text: NoticeText, now: float) -> EmailMessage:
    """The notice for one message: which recipients wait and why, and what the sender can do."""
    msg = EmailMessage()
    msg["From"] = text.from_address or f"Mail Delivery System <MAILER-DAEMON@{text.myhostname}>"
    msg["To"] = e.sender
    first = e.recipients[0].address
    more = f" and {len(e.recipients) - 1} more" if len(e.recipients) > 1 else ""
    msg["Subject"] = f"Delayed mail to {first}{more}: TLS security policy"
    msg["Date"] = formatdate(now, localtime=False)
    msg["Message-ID"] = make_msgid("requiretls-notify", domain=text.myhostname)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-RequireTLS-Notice"] = e.queue_id
    lines = [
        f"This is the mail system at host {text.myhostname}.",
        "",
        "THIS IS A WARNING ONLY. Your message has not been lost; it is still being retried.",
        "",
        "Your message",
    ]
    if e.subject:
        lines.append(f"  Subject:    {e.subject}")
    if e.message_id:
        lines.append(f"  Message-ID: {e.message_id}")
    lines += [
        f"  queued:     {format_datetime(datetime.fromtimestamp(e.arrival_time, UTC))} (queue id {e.queue_id})",
        "",
        f"has waited {_hours(e.age(now))} for these recipients, because a connection to their mail server with",
        "the security that TLS policy requires (DANE, MTA-STS, or this server's own policy) could not be made:",
        "",
    ]
    for r in e.recipients:
        lines += [f"  <{r.address}>", f"    reason: {r.reason}"]
    lines.append("")
    groups: dict[OptoutVerdict, list[str]] = {}
    for r in e.recipients:
        groups.setdefault(r.optout, []).append(r.address)
    for verdict, addrs in groups.items():
        who = ", ".join(f"<{a}>" for a in addrs)
        lines += _advice(verdict, who, text.optout_cookie)
        lines.append("")
    lines += [
        "If nothing changes, the mail system keeps trying until the message expires and then returns it to you.",
        "",
    ]
    msg.set_content("\n".join(lines))
    return msg


def _advice(verdict: OptoutVerdict, who: str, cookie: str) -> list[str]:
    if verdict is OptoutVerdict.ALLOWED:
        return [
            f"What you can do about {who}:",
            "If this message does not need protection on its way, you may send it again with",
            f"  {cookie}",
            "anywhere in the Subject, or with the header field",
            "  TLS-Required: No",
            "(RFC 8689). The new copy is then delivered even where no secure connection can be made, possibly",
            "unencrypted. Send it through this mail server as usual (authenticated). The waiting copy stays queued",
            "and is delivered if the problem is fixed; ask your postmaster to remove it if you resend.",
        ]
    if verdict is OptoutVerdict.REQUIRETLS:
        return [
            f"About {who}: your message requires TLS (REQUIRETLS). It is never sent without a verified secure",
            "connection, and the opt-out does not apply to it. If no secure path appears before it expires, it",
            "will be returned to you (bounce).",
        ]
    if verdict is OptoutVerdict.ALREADY:
        return [
            f"About {who}: your message already says TLS-Required: No; it waits because the destination's",
            "policy on this server does not allow the opt-out. Ask your postmaster.",
        ]
    return [
        f"About {who}: sending the message without the required security is not possible:",
        f"{verdict_text(verdict)}. Ask your postmaster if it is urgent.",
    ]


Sender = Callable[[EmailMessage, str], str]
_QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")


def submit(s: smtplib.SMTP, sender: str, rcpts: Sequence[str], data: bytes,
           mail_options: Sequence[str] = (), rcpt_options: Callable[[str], Sequence[str]] | None = None) -> str:
    """One SMTP transaction on an open connection; the new queue id from the DATA reply.  Any refusal raises
    (:class:`smtplib.SMTPException`): then nothing was queued."""
    s.ehlo()
    code, resp = s.mail(sender, list(mail_options))
    if code != 250:
        raise smtplib.SMTPSenderRefused(code, resp, sender)
    for r in rcpts:
        code, resp = s.rcpt(r, list(rcpt_options(r) if rcpt_options else ()))
        if code not in (250, 251):
            raise smtplib.SMTPRecipientsRefused({r: (code, resp)})
    code, resp = s.data(data)
    if code != 250:
        raise smtplib.SMTPDataError(code, resp)
    m = _QUEUED_AS.search(resp.decode(errors="replace"))
    return m.group(1) if m else ""


def smtp_sender(endpoint: Endpoint, timeout: float = 30.0) -> Sender:
    """Send a notice with the null envelope sender through the re-injection smtpd; returns its queue id."""

    def send(msg: EmailMessage, rcpt: str) -> str:
        with smtplib.SMTP(endpoint.host, endpoint.port, timeout=timeout, local_hostname="localhost") as s:
            return submit(s, "", [rcpt], msg.as_bytes())

    return send


@dataclass(frozen=True, slots=True)
class RunResult:
    notified: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


def run_once(entries: Sequence[TlsDeferred], state: NotifyState, *, delay: float, local_domains: frozenset[str],
             notify_authenticated: bool, text: NoticeText, send: Sender, now: float | None = None,
             dry_run: bool = False) -> RunResult:
    """One pass over the TLS-deferred messages (the caller holds ``state.locked()``)."""
    t = time.time() if now is None else now
    notified: list[str] = []
    skipped: list[tuple[str, str]] = []
    present = {message_key(e) for e in entries}
    for e in entries:
        key = message_key(e)
        if key in state.records:
            continue
        if e.age(t) < delay:
            skipped.append((e.queue_id, "younger than notify.delay"))
            continue
        why = eligible_sender(e, local_domains, notify_authenticated)
        if why is None:
            skipped.append((e.queue_id, f"sender <{e.sender}> is neither local nor authenticated"))
            log.info("%s: notify: %s", e.queue_id, kv(sender=e.sender, status="skipped",
                                                      reason="sender neither local nor authenticated"))
            continue
        msg = compose(e, text, t)
        if dry_run:
            notified.append(e.queue_id)
            continue
        state.records[key] = {"at": t, "sender": e.sender, "state": "sending", "queue_id": e.queue_id}
        state.save()
        try:
            new_id = send(msg, e.sender)
        except (OSError, smtplib.SMTPException) as err:
            # Refused or no connection: nothing was queued; the next run tries again.
            del state.records[key]
            state.save()
            log.warning("%s: notify: %s", e.queue_id, kv(sender=e.sender, status="deferred", reason=str(err)))
            skipped.append((e.queue_id, f"notice not sent: {err}"))
            continue
        state.records[key]["state"] = "sent"
        state.save()
        notified.append(e.queue_id)
        verdicts = ",".join(sorted({str(r.optout) for r in e.recipients}))
        log.info("%s: notify: %s", e.queue_id, kv(sender=e.sender, why=why, recipients=len(e.recipients),
                                                  optout=verdicts, notice=new_id or None, status="sent"))
    for key, rec in state.records.items():
        if rec.get("state") == "sending" and key in present:
            log.warning("%s: notify: a previous run stopped while sending this notice; not sent again",
                        rec.get("queue_id", key))
    state.prune(present, t)
    if not dry_run:
        state.save()
    return RunResult(tuple(notified), tuple(skipped))
