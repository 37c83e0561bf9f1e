"""Typed facts and decisions that cross the boundary of the decision core.

Everything here is immutable: adapters (milter, policyd, relay, ``requiretls explain``) build the facts,
:func:`requiretls.policy.decide` turns them into a :class:`Decision`, and the adapter acts on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal


class MessageClass(enum.StrEnum):
    """The three delivery classes of the architecture ("Message classes")."""

    #: Relay only over authenticated TLS to a securely found MX that offers REQUIRETLS (RFC 8689 §4.2.1).
    REQUIRETLS = "requiretls"
    #: ``TLS-Required: No`` honoured: opportunistic TLS, DANE/MTA-STS ignored (RFC 8689 §4.2.2).
    OPTOUT = "optout"
    #: The destination's normal policy (DANE, MTA-STS, local table).
    DEFAULT = "default"


class OptoutFrom(enum.StrEnum):
    """Who may opt a message out of DANE/MTA-STS with ``TLS-Required: No``."""

    #: Anyone, as RFC 8689 §4.1 and Postfix 3.10 do.
    ANY = "any"
    #: Only SASL-authenticated clients or clients in ``trusted_networks``.
    TRUSTED = "trusted"
    #: Nobody: the header is ignored (logged) and the normal policy applies.
    NONE = "none"


class PreflightMode(enum.StrEnum):
    """What to do at submission when a ``requiretls`` message cannot possibly be delivered."""

    OFF = "off"
    WARN = "warn"
    REJECT = "reject"


class Readiness(enum.StrEnum):
    """Pre-flight knowledge about one destination domain, supplied by the adapter (from ``requiretls.dest``)."""

    POSSIBLE = "possible"
    IMPOSSIBLE = "impossible"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Envelope:
    """SMTP envelope. ``sender`` is ``""`` for the null reverse-path; ``esmtp_params`` as given in MAIL FROM."""

    sender: str
    recipients: tuple[str, ...]
    esmtp_params: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Session:
    """What the MTA knows about the submitting client."""

    sasl_user: str | None = None
    client_ip: str | None = None
    tls_version: str | None = None


@dataclass(frozen=True, slots=True)
class DestinationReadiness:
    """The adapter's pre-flight finding for one recipient domain."""

    readiness: Readiness
    reason: str = ""
    #: Enhanced status code for a pre-flight refusal: 5.7.30 (no REQUIRETLS) or 5.7.10 (no authenticated TLS).
    dsn: str = "5.7.30"


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """Everything the decision needs to know about one message.

    ``headers`` are the header fields in order, as ``(name, value)``; a value keeps its folding (CRLF or LF
    followed by white space) and has no trailing line break, as a milter receives it.
    ``readiness`` maps a lower-case recipient domain to its pre-flight result; it may be empty.
    """

    envelope: Envelope
    session: Session = field(default_factory=Session)
    headers: tuple[tuple[str, str], ...] = ()
    readiness: tuple[tuple[str, DestinationReadiness], ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """One header change. ``index`` is the 1-based occurrence among fields of that name (for change/delete)."""

    action: Literal["add", "change", "delete"]
    name: str
    value: str = ""
    index: int = 1


@dataclass(frozen=True, slots=True)
class Rejection:
    """An SMTP reply to give the client instead of accepting the message."""

    code: int
    dsn: str
    text: str


@dataclass(frozen=True, slots=True)
class RecipientDecision:
    recipient: str
    msg_class: MessageClass
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one message.

    ``msg_class`` is the class the message is routed by (Postfix routes a message as a whole);
    ``recipients`` gives the effective class per recipient (an ``optout=no`` destination keeps ``default``).
    ``envelope_params`` are MAIL FROM parameters the adapter should set (``RET=HDRS`` for ``requiretls``).
    """

    msg_class: MessageClass
    recipients: tuple[RecipientDecision, ...]
    header_edits: tuple[HeaderEdit, ...]
    reject: Rejection | None
    reasons: tuple[str, ...]
    envelope_params: tuple[str, ...] = ()
    #: The REQUIRETLS tag came in a form Postfix 3.11 carries and enforces itself (MAIL FROM parameter or a
    #: received ``Require-TLS-ESMTP: yes``), so 3.11 needs no re-routing for it.
    native_requiretls: bool = False

    def to_json(self) -> dict[str, object]:
        """The ``requiretls explain --json`` shape."""
        return {
            "class": str(self.msg_class),
            "recipients": {
                r.recipient: {"class": str(r.msg_class), "reasons": list(r.reasons)} for r in self.recipients
            },
            "reasons": list(self.reasons),
            "header_edits": [
                {"action": e.action, "name": e.name, "value": e.value}
                if e.action == "add"
                else {"action": e.action, "name": e.name, "value": e.value, "index": e.index}
                for e in self.header_edits
            ],
            "reject": None
            if self.reject is None
            else {"code": self.reject.code, "dsn": self.reject.dsn, "text": self.reject.text},
            "envelope_params": list(self.envelope_params),
        }
