"""Which queued messages wait because of TLS policy, and what their senders may do about it.

Facts come from ``postqueue -j`` (sender, recipients, the reason Postfix recorded for each deferred recipient)
and ``postcat -e -h`` (DSN parameters, SASL login, the header: REQUIRETLS and opt-out markers); this module only
parses and judges them (the I/O is :mod:`requiretls.notify.tools`).

TLS deferral reasons, as Postfix 3.7.11, 3.10.13 and 3.11.7 record them (the same wording on all three, collected
in the testbed; ``delay_reason`` carries no DSN code):

* ``TLS is required, but was not offered by host ...`` (DANE/``encrypt``/MTA-STS destination without STARTTLS)
* ``Server certificate not verified`` (TLSA mismatch, MTA-STS certificate expired, wrong name, untrusted)
* ``Server certificate not trusted``, ``Cannot start TLS: handshake failure``, ``TLS is required, but host ...
  refused to start TLS``, ``TLS is required, but our TLS engine is unavailable``, ``TLSA lookup error``,
  ``TLS policy lookup ...`` (Postfix's other TLS-policy deferrals, from its source)
* ``Sender requested REQUIRETLS, but ...`` (3.11's native REQUIRETLS)
* ``host ...[requiretls/relay.sock] said: 4xx ...`` (our delivery agent deferring a REQUIRETLS message: DNS
  trouble, no MX that qualifies yet)
"""

from __future__ import annotations

import enum
import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from requiretls.policy.headers import (
    REQUIRE_TLS_ESMTP,
    ROUTE_HEADER,
    TlsRequiredState,
    header_values,
    parse_tls_required,
    require_tls_esmtp,
)
from requiretls.policy.local import LocalPolicy
from requiretls.policy.model import OptoutFrom
from requiretls.policy.table import split_address

#: Postfix's TLS-policy deferral texts (see the module documentation); matched case-insensitively.
_TLS_REASONS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(rx, re.IGNORECASE), kind)
    for rx, kind in (
        (r"Sender requested REQUIRETLS", "requiretls"),
        (r"TLS is required, but", "tls-required"),
        (r"Server certificate not (?:verified|trusted)", "certificate"),
        (r"certificate verification failed", "certificate"),
        (r"Cannot start TLS", "tls-handshake"),
        (r"TLSA lookup (?:error|failure)", "dane"),
        (r"TLS policy lookup", "policy-lookup"),
        (r"MTA-STS", "mta-sts"),
        (r"\bDANE\b", "dane"),
    )
)
#: ``host NAME[ADDR] said: 4xx ...`` as Postfix records a next hop's reply.
_SAID = re.compile(r"^host (?P<host>\S+?)\[(?P<addr>[^\]]*)\] said: (?P<code>4\d\d)\b")
#: Postfix's sendopts bit for a message received with MAIL FROM REQUIRETLS (3.11, ``SOPT_REQUIRETLS_ESMTP``).
SOPT_REQUIRETLS_ESMTP = 32
#: Postfix's DSN bits (dsn_mask.h): NOTIFY and RET as stored in the queue file.
_NOTIFY_BITS = ((1, "NEVER"), (2, "SUCCESS"), (4, "FAILURE"), (8, "DELAY"))
_RET_BITS = {1: "FULL", 2: "HDRS"}


def tls_reason_kind(reason: str, agent_addresses: Iterable[str] = ()) -> str | None:
    """What kind of TLS-policy deferral ``reason`` (a ``delay_reason``) is, or None if it is none.

    ``agent_addresses``: how Postfix names our delivery agent in ``host X[ADDR] said:`` (``requiretls/relay.sock``
    for ``lmtp:unix:requiretls/relay.sock``, ``127.0.0.1`` for an inet listener): its 4xx replies are deferrals of
    a REQUIRETLS message."""
    for rx, kind in _TLS_REASONS:
        if rx.search(reason):
            return kind
    m = _SAID.match(reason)
    if m and m.group("addr") in set(agent_addresses):
        return "requiretls-agent"
    return None


@dataclass(frozen=True, slots=True)
class QueuedRecipient:
    address: str
    delay_reason: str
    orig_address: str = ""


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """One line of ``postqueue -j``."""

    queue_name: str
    queue_id: str
    arrival_time: int
    message_size: int
    sender: str
    recipients: tuple[QueuedRecipient, ...]
    forced_expire: bool = False

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> QueuedMessage:
        rcpts = tuple(
            QueuedRecipient(str(r.get("address", "")), str(r.get("delay_reason", "")), str(r.get("orig_address", "")))
            for r in obj.get("recipients", [])
        )
        return cls(str(obj["queue_name"]), str(obj["queue_id"]), int(obj.get("arrival_time", 0)),
                   int(obj.get("message_size", 0)), str(obj.get("sender", "")), rcpts,
                   bool(obj.get("forced_expire", False)))


def parse_postqueue(text: str) -> list[QueuedMessage]:
    """``postqueue -j`` output -> messages.  A line that is not a queue entry raises ValueError (with the line)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(QueuedMessage.from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"postqueue -j line {n} is not a queue entry ({e}): {line[:200]!r}") from None
    return out


@dataclass(frozen=True, slots=True)
class RcptDsn:
    """A recipient's DSN parameters as the queue file holds them."""

    address: str
    notify: tuple[str, ...] = ()
    orcpt: str = ""

    def rcpt_options(self) -> list[str]:
        opts = []
        if self.notify:
            opts.append("NOTIFY=" + ",".join(self.notify))
        if self.orcpt:
            opts.append("ORCPT=" + _xtext(self.orcpt))
        return opts


def _xtext(value: str) -> str:
    """RFC 3461 xtext for ORCPT (``+XX`` for '+', '=', controls and non-ASCII); the ``type;`` prefix is kept."""
    kind, semi, addr = value.partition(";")
    if not semi:
        kind, addr = "rfc822", value
    enc = "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
                  for c in addr)
    return f"{kind};{enc}"


@dataclass(frozen=True, slots=True)
class QueueFile:
    """What ``postcat -e -h`` shows of one message."""

    sender: str = ""
    envid: str = ""
    ret: str = ""
    sendopts: int = 0
    sasl_username: str = ""
    client_address: str = ""
    recipients: tuple[RcptDsn, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    content_filter: str = ""

    def mail_options(self) -> list[str]:
        opts = []
        if self.ret:
            opts.append(f"RET={self.ret}")
        if self.envid:
            opts.append("ENVID=" + "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}"
                                           for c in self.envid))
        return opts

    def dsn_for(self, address: str) -> RcptDsn:
        for r in self.recipients:
            if r.address == address:
                return r
        return RcptDsn(address)


_MARKER = re.compile(r"^\*\*\* (ENVELOPE RECORDS|MESSAGE CONTENTS|HEADER EXTRACTED|MESSAGE FILE END) .*\*\*\*$")


def parse_postcat(text: str) -> QueueFile:
    """``postcat -e -h -q ID`` output -> :class:`QueueFile`.  Header lines are those of the MESSAGE CONTENTS
    section (``-e -h`` together) or after MESSAGE FILE END (the two flags run apart)."""
    section = ""
    attrs: dict[str, str] = {}
    ret_flags = 0
    sender = ""
    sendopts = 0
    content_filter = ""
    rcpts: list[RcptDsn] = []
    pending_notify: tuple[str, ...] = ()
    pending_orcpt = ""
    header_lines: list[str] = []
    for line in text.splitlines():
        m = _MARKER.match(line)
        if m:
            section = m.group(1)
            continue
        if section in ("MESSAGE CONTENTS", "MESSAGE FILE END"):
            header_lines.append(line)
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            continue
        value = value.strip()
        if key == "message_size":
            fields = value.split()
            if len(fields) >= 6 and fields[5].isdigit():
                sendopts = int(fields[5])
        elif key == "sender":
            sender = value
        elif key == "content_filter":
            content_filter = value
        elif key == "named_attribute":
            name, _, v = value.partition("=")
            if name == "ret_flags" and v.isdigit():
                ret_flags = int(v)
            elif name == "notify_flags" and v.isdigit():
                bits = int(v)
                pending_notify = tuple(word for bit, word in _NOTIFY_BITS if bits & bit)
            elif name == "dsn_orig_rcpt":
                pending_orcpt = v
            else:
                attrs.setdefault(name, v)
        elif key == "recipient":
            rcpts.append(RcptDsn(value, pending_notify, pending_orcpt))
            pending_notify, pending_orcpt = (), ""
    headers = _headers(header_lines)
    return QueueFile(sender, attrs.get("envelope_id", ""), _RET_BITS.get(ret_flags, ""), sendopts,
                     attrs.get("sasl_username", ""), attrs.get("client_address", ""), tuple(rcpts), headers,
                     content_filter)


def _headers(lines: Sequence[str]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for line in lines:
        if not line.strip():
            break
        if line[:1] in (" ", "\t") and out:
            name, value = out[-1]
            out[-1] = (name, value + "\r\n" + line)
            continue
        name, sep, value = line.partition(":")
        if sep and name and " " not in name:
            out.append((name, value.lstrip(" ")))
    return tuple(out)


class OptoutVerdict(enum.StrEnum):
    ALLOWED = "allowed"
    #: a REQUIRETLS message: it is delivered securely or bounces; never relaxed (RFC 8689 section 4.1)
    REQUIRETLS = "requiretls"
    #: the destination's rule says optout=no
    DESTINATION = "destination-optout-no"
    #: the sender's rule says optout=no
    SENDER = "sender-optout-no"
    #: optout_from = none
    DISABLED = "optout-disabled"
    #: the message already carries the opt-out: it waits for something else (an optout=no rule, say)
    ALREADY = "already-opted-out"


_VERDICT_TEXT = {
    OptoutVerdict.ALLOWED: "opt-out allowed",
    OptoutVerdict.REQUIRETLS: "REQUIRETLS message: never relaxed; it bounces if no secure path appears",
    OptoutVerdict.DESTINATION: "the destination's policy forbids opt-out (optout=no)",
    OptoutVerdict.SENDER: "opt-out is not allowed for this sender (sender rule optout=no)",
    OptoutVerdict.DISABLED: "opt-out is disabled on this server (optout_from = none)",
    OptoutVerdict.ALREADY: "the message is already opted out (TLS-Required: No)",
}


def verdict_text(v: OptoutVerdict) -> str:
    return _VERDICT_TEXT[v]


@dataclass(frozen=True, slots=True)
class WaitingRecipient:
    address: str
    reason: str
    kind: str
    optout: OptoutVerdict
    rule: str = ""


@dataclass(frozen=True, slots=True)
class TlsDeferred:
    """A queued message with at least one recipient deferred because of TLS policy."""

    queue_id: str
    queue_name: str
    sender: str
    arrival_time: int
    requiretls: bool
    requiretls_why: str
    sasl_username: str
    recipients: tuple[WaitingRecipient, ...]
    #: recipients of the message that wait for other reasons (not TLS): left alone by release
    other_recipients: tuple[str, ...] = ()
    message_id: str = ""
    subject: str = ""
    queue_file: QueueFile = field(default_factory=QueueFile)

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.arrival_time)

    @property
    def optout_allowed(self) -> bool:
        return bool(self.recipients) and all(r.optout is OptoutVerdict.ALLOWED for r in self.recipients)

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        return {
            "queue_id": self.queue_id,
            "queue_name": self.queue_name,
            "sender": self.sender,
            "arrival_time": self.arrival_time,
            "age_seconds": int(self.age(now)),
            "requiretls": self.requiretls,
            "sasl_username": self.sasl_username or None,
            "optout_allowed": self.optout_allowed,
            "recipients": [
                {"address": r.address, "delay_reason": r.reason, "kind": r.kind, "optout": str(r.optout),
                 "optout_text": verdict_text(r.optout)}
                for r in self.recipients
            ],
            "other_recipients": list(self.other_recipients),
        }


def requiretls_marker(qf: QueueFile, policy: LocalPolicy, rcpts: Sequence[str], sender: str) -> str:
    """Why the message is REQUIRETLS (empty: it is not): Postfix 3.11's sendopts or carrier header, our route
    header (the milter routed it to the agent as REQUIRETLS), or a local rule that tags it."""
    if qf.sendopts & SOPT_REQUIRETLS_ESMTP:
        return "MAIL FROM REQUIRETLS (queue file)"
    if require_tls_esmtp(qf.headers):
        return f"{REQUIRE_TLS_ESMTP}: yes"
    routes = {v.strip().lower() for v in header_values(qf.headers, ROUTE_HEADER)}
    if routes & {"relay", "reinject"}:
        return f"{ROUTE_HEADER}: {sorted(routes & {'relay', 'reinject'})[0]}"
    rule = policy.senders.lookup_sender(sender) if sender else None
    if rule is not None and rule.requiretls:
        return f"sender rule {rule.filename}:{rule.line} requiretls=yes"
    for rcpt in rcpts:
        entry = policy.table.lookup_domain(split_address(rcpt)[1])
        if entry is not None and entry.requiretls:
            return f"destination rule {entry.filename}:{entry.line} requiretls=yes"
    return ""


def already_opted_out(qf: QueueFile) -> bool:
    routes = {v.strip().lower() for v in header_values(qf.headers, ROUTE_HEADER)}
    if routes & {"relaxed", "relay-optout"}:
        return True
    # TLS-Required or, on 3.10+, the received field renamed by our header_checks (X-Original-TLS-Required)
    return parse_tls_required(qf.headers).state is TlsRequiredState.NO


def judge(msg: QueuedMessage, qf: QueueFile, policy: LocalPolicy,
          agent_addresses: Iterable[str] = ()) -> TlsDeferred | None:
    """The message as ``requiretls queue`` shows it, or None when no recipient waits because of TLS policy."""
    agents = tuple(agent_addresses)
    waiting = [(r, kind) for r in msg.recipients if r.delay_reason
               and (kind := tls_reason_kind(r.delay_reason, agents)) is not None]
    if not waiting:
        return None
    why = requiretls_marker(qf, policy, [r.address for r in msg.recipients], msg.sender)
    opted = already_opted_out(qf)
    sender_rule = policy.senders.lookup_sender(msg.sender) if msg.sender else None
    out = []
    for r, kind in waiting:
        rule = ""
        if why:
            verdict = OptoutVerdict.REQUIRETLS
        elif opted:
            verdict = OptoutVerdict.ALREADY
        elif policy.optout_from is OptoutFrom.NONE:
            verdict = OptoutVerdict.DISABLED
        elif sender_rule is not None and sender_rule.optout is False:
            verdict, rule = OptoutVerdict.SENDER, f"{sender_rule.filename}:{sender_rule.line}"
        else:
            entry = policy.table.lookup_domain(split_address(r.address)[1])
            if entry is not None and entry.optout is False:
                verdict, rule = OptoutVerdict.DESTINATION, f"{entry.filename}:{entry.line}"
            else:
                verdict = OptoutVerdict.ALLOWED
        out.append(WaitingRecipient(r.address, r.delay_reason, kind, verdict, rule))
    waiting_set = {r.address for r, _ in waiting}
    others = tuple(r.address for r in msg.recipients if r.address not in waiting_set)
    mid = next(iter(header_values(qf.headers, "Message-ID")), "").strip()
    subject = next(iter(header_values(qf.headers, "Subject")), "").strip()
    return TlsDeferred(msg.queue_id, msg.queue_name, msg.sender, msg.arrival_time, bool(why), why,
                       qf.sasl_username, tuple(out), others, mid, subject, qf)


def format_age(seconds: float) -> str:
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def format_text(entries: Sequence[TlsDeferred], now: float | None = None) -> str:
    """The readable form of ``requiretls queue``."""
    if not entries:
        return "no message is deferred because of TLS policy\n"
    out = []
    for e in entries:
        flags = ["REQUIRETLS" if e.requiretls else "", f"sasl={e.sasl_username}" if e.sasl_username else ""]
        head = f"{e.queue_id}  {e.queue_name}  age {format_age(e.age(now))}  from <{e.sender}>"
        out.append(" ".join([head, *[f for f in flags if f]]))
        for r in e.recipients:
            out.append(f"  to <{r.address}>: {r.reason}")
            extra = f" ({r.rule})" if r.rule else ""
            out.append(f"    opt-out: {r.optout}: {verdict_text(r.optout)}{extra}")
        for a in e.other_recipients:
            out.append(f"  to <{a}>: waiting for another reason (not TLS policy)")
    return "\n".join(out) + "\n"
