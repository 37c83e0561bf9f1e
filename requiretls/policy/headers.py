"""Header-level rules: the ``TLS-Required`` field (RFC 8689 §3), Postfix 3.11's ``Require-TLS-ESMTP`` carrier,
the subject cookies (RFC 2047 encoded words), and the names, format and parse of our private header fields
(the route header and the hand-back list), so that the milter that writes them and the agent that reads them
share one definition.

All functions are pure: strings in, typed results out.
"""

from __future__ import annotations

import email.errors
import email.header
import email.quoprimime
import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TLS_REQUIRED = "TLS-Required"
#: The name Postfix >= 3.10 is told (header_checks REPLACE) to give a received ``TLS-Required`` field, so that
#: Postfix does not apply it natively before local governance has been applied; the milter restores it.
ORIGINAL_TLS_REQUIRED = "X-Original-TLS-Required"
REQUIRE_TLS_ESMTP = "Require-TLS-ESMTP"
#: Private field the milter adds to steer delivery; ``milter_header_checks`` turns it into FILTER.  Inbound
#: copies are forgeries and are removed (by header_checks IGNORE first, and by the milter as well).
ROUTE_HEADER = "X-RequireTLS-Route"
#: Private field listing the recipients the delivery agent hands back to Postfix (local, transport_maps).
HANDBACK_HEADER = "X-RequireTLS-Handback"
#: Private field giving the agent, per recipient, the SMTP next hop Postfix chose (relayhost, sender-dependent
#: relayhost, transport_maps) or why no transport here can carry REQUIRETLS to it (``refuse:MAILER``).
NEXTHOP_HEADER = "X-RequireTLS-Nexthop"
PRIVATE_HEADERS = (ROUTE_HEADER, HANDBACK_HEADER, NEXTHOP_HEADER)

# RFC 5322 §3.2.2 FWS, standard and obsolete forms, as it may precede the value.  The line break of a fold is
# CRLF on the wire; milters and queue files may give a bare LF, so both are accepted.
_FWS = r"(?:(?:[ \t]*\r?\n)?[ \t]+|[ \t]+(?:\r?\n[ \t]+)*)"
# RFC 8689 §3: requiretls-field = "TLS-Required:" [FWS] "No" CRLF.  ABNF literals are case-insensitive
# (RFC 5234 §2.3); nothing may follow "No" on the line, not even white space or a comment.
_TLS_REQUIRED_NO = re.compile(rf"{_FWS}?no", re.IGNORECASE)
_FOLD = re.compile(r"\r?\n(?=[ \t])")


class TlsRequiredState(enum.Enum):
    """What the message's ``TLS-Required`` fields amount to."""

    ABSENT = "absent"
    NO = "no"
    MALFORMED = "malformed"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class TlsRequired:
    state: TlsRequiredState
    detail: str


def unfold(value: str) -> str:
    """Remove folding line breaks (RFC 5322 §2.2.3); the white space after each break stays."""
    return _FOLD.sub("", value)


def header_values(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    """All values of the fields called ``name`` (field names are case-insensitive, RFC 5322 §1.2.2)."""
    lname, size = name.lower(), len(name)
    return [v for n, v in headers if len(n) == size and n.lower() == lname]  # the length test skips most lower()


#: Every field the decision reads (lower case), and their lengths for a cheap first test.
_DECISION_FIELDS = frozenset(
    n.lower() for n in ("Subject", TLS_REQUIRED, ORIGINAL_TLS_REQUIRED, REQUIRE_TLS_ESMTP, *PRIVATE_HEADERS)
)
_DECISION_LENGTHS = frozenset(len(n) for n in _DECISION_FIELDS)


def decision_fields(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The fields the decision reads, in order: one pass over the header instead of one per name (a message
    has dozens of Received and DKIM fields that no rule looks at)."""
    lengths, names = _DECISION_LENGTHS, _DECISION_FIELDS
    return tuple((n, v) for n, v in headers if len(n) in lengths and n.lower() in names)


def parse_tls_required(headers: Sequence[tuple[str, str]]) -> TlsRequired:
    """Classify the ``TLS-Required`` fields of a message by RFC 8689 §3.

    Exactly one field whose value is ``[FWS] "No"`` is an opt-out.  More than one field is forbidden by §3
    ("MUST NOT appear") and, like any other value, is treated as malformed: the normal policy applies.
    """
    values = header_values(headers, TLS_REQUIRED) + header_values(headers, ORIGINAL_TLS_REQUIRED)
    if not values:
        return TlsRequired(TlsRequiredState.ABSENT, "no TLS-Required field")
    if len(values) > 1:
        return TlsRequired(
            TlsRequiredState.DUPLICATE,
            f"{len(values)} TLS-Required fields: more than one is malformed (RFC 8689 §3), ignored",
        )
    value = values[0]
    if _TLS_REQUIRED_NO.fullmatch(value):
        return TlsRequired(TlsRequiredState.NO, "TLS-Required: No (RFC 8689 §3)")
    return TlsRequired(
        TlsRequiredState.MALFORMED,
        f"malformed TLS-Required value {unfold(value).strip()[:60]!r}: only 'No' is defined (RFC 8689 §3), ignored",
    )


def require_tls_esmtp(headers: Sequence[tuple[str, str]]) -> bool:
    """True when a ``Require-TLS-ESMTP: yes`` field is present (Postfix 3.11's REQUIRETLS carrier header).

    It can only upgrade a message, so any sender may use it, as Postfix 3.11 allows.
    """
    return any(unfold(v).strip(" \t").lower() == "yes" for v in header_values(headers, REQUIRE_TLS_ESMTP))


def decode_subject(value: str) -> tuple[str, bool]:
    """Decode RFC 2047 encoded words in a Subject.  Returns the text and whether any encoded word was found.

    An undecodable encoded word (unknown charset, bad base64) leaves the raw text, so a cookie can still be
    matched in the readable part and nothing is lost.
    """
    raw = unfold(value).strip(" \t")
    if "=?" not in raw:
        return raw, False
    try:
        parts = email.header.decode_header(raw)
        text = str(email.header.make_header(parts))
    except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        return raw, False
    encoded = any(charset is not None for _, charset in parts)
    return text, encoded


def find_cookie(subject_text: str, cookie: str) -> int:
    """Index of the cookie in a decoded subject (case-insensitive), or -1."""
    if not cookie:
        return -1
    return subject_text.lower().find(cookie.lower())


def remove_cookie(subject_text: str, cookie: str) -> str:
    """The subject with the first occurrence of ``cookie`` removed and the white space around it tidied."""
    i = find_cookie(subject_text, cookie)
    if i < 0:
        return subject_text
    before, after = subject_text[:i].rstrip(" \t"), subject_text[i + len(cookie) :].lstrip(" \t")
    return f"{before} {after}" if before and after else before + after


def writable(value: str) -> bool:
    """Whether a value can go back to the MTA as a header edit.  Bytes that are not UTF-8 reach us as lone
    surrogates (the milter decodes with ``surrogateescape``) and pymilter encodes edits as strict UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: Raw bytes per encoded word: "=?unknown-8bit?q?" + 3 x 18 + "?=" stays within RFC 2047 §2's 75 characters.
_RAW_PER_WORD = 18


def encode_subject(text: str) -> str:
    """Render a subject for a header edit: plain when ASCII, else RFC 2047 UTF-8 encoded words.

    Bytes that are not UTF-8 (an 8-bit Subject in some legacy charset, seen as lone surrogates) are kept as
    they were, in ``unknown-8bit`` encoded words (RFC 1428's charset name for 8-bit text of unknown charset):
    the edit can then be written, and no byte of the sender's text is lost or guessed.
    """
    if text.isascii():
        return text
    if writable(text):
        return email.header.Header(text, "utf-8", maxlinelen=998).encode()
    raw = text.encode("utf-8", "surrogateescape")
    words = [
        email.quoprimime.header_encode(raw[i : i + _RAW_PER_WORD], "unknown-8bit")
        for i in range(0, len(raw), _RAW_PER_WORD)
    ]
    # Adjacent encoded words separated by white space decode as one text (RFC 2047 §6.2); fold every 12 words
    # so that no line passes 998 characters.
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return "\n ".join(lines)


def parse_header_block(raw: bytes) -> tuple[tuple[str, str], ...]:
    """Split the header section of a raw RFC 5322 message into ``(name, value)`` pairs.

    Values keep their folds (as LF) and lose the single space after the colon, as a milter would see them.
    Lines that are neither fields nor continuations (broken input) are skipped.
    """
    text = raw.decode("utf-8", errors="replace")
    fields: list[list[str]] = []
    # Lines end at LF only, as Postfix splits them: str.splitlines() would also split at VT, FF, FS, GS, RS, NEL and
    # U+2028 inside a value, and show fields that no MTA sees (found by tests/fuzz).
    for line in text.split("\n"):
        if line == "" or line == "\r":
            break
        line = line.rstrip("\r")
        if line[:1] in (" ", "\t"):
            if fields:
                fields[-1][1] += "\n" + line
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or not name.isprintable():
            continue
        fields.append([name, value[1:] if value.startswith(" ") else value])
    return tuple((n, v) for n, v in fields)


def route_value(headers: Iterable[tuple[str, str]]) -> str | None:
    """The value of the first route field, unfolded and trimmed, or None when there is none."""
    values = header_values(headers, ROUTE_HEADER)
    return unfold(values[0]).strip() if values else None


def drop_fields(head: bytes, names: Iterable[str]) -> list[bytes]:
    """The lines of a raw header section (split at LF, each keeping its CR) without the fields named in
    ``names`` (any case), continuation lines included."""
    drop = {n.lower() for n in names}
    kept: list[bytes] = []
    skipping = False
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower().decode("ascii", "replace") in drop
        if not skipping:
            kept.append(line)
    return kept


def format_handback(addresses: Iterable[str]) -> str:
    """The hand-back field value: each address in angle brackets, as a path is written (RFC 5321 §4.1.2),
    separated by ``", "``.  The addresses are as the milter got them, without brackets."""
    return ", ".join(f"<{a}>" for a in addresses)


def _bracketed(value: str) -> Iterable[tuple[str, int]]:
    """Each ``<address>`` in ``value`` with the index just past its ``>``.  A ``>``, ``<`` or ``,`` inside a
    quoted local part (RFC 5321 §4.1.2 Quoted-string, with ``\\`` escapes) belongs to the address; an unclosed
    bracket ends the scan."""
    i, n = 0, len(value)
    while True:
        i = value.find("<", i)
        if i < 0:
            return
        j, quoted = i + 1, False
        while j < n:
            c = value[j]
            if quoted and c == "\\":
                j += 2
                continue
            if c == '"':
                quoted = not quoted
            elif c == ">" and not quoted:
                break
            j += 1
        if j >= n:
            return
        yield value[i + 1 : j], j + 1
        i = j + 1


def parse_handback(values: Iterable[str]) -> tuple[str, ...]:
    """The addresses in hand-back field values (see :func:`format_handback`), in order.

    Text outside brackets (separators, folding) is skipped.  Without the quoting rule of :func:`_bracketed`,
    ``<"a>b"@x>`` would hand back an address that is not a recipient and keep the real one, which the agent
    would then send out itself.
    """
    return tuple(addr for value in values for addr, _ in _bracketed(value))


def format_nexthops(pairs: Iterable[tuple[str, str]]) -> str:
    """The next-hop field value: ``<address> VALUE`` per recipient, separated by ``", "``.  A VALUE holds no
    white space and no comma (the milter refuses a next hop that does)."""
    return ", ".join(f"<{a}> {v}" for a, v in pairs)


def parse_nexthops(values: Iterable[str]) -> dict[str, str]:
    """Recipient -> VALUE from next-hop field values (see :func:`format_nexthops`); an entry without a value
    is skipped (the recipient then goes the default way, its domain's MX, which never weakens it)."""
    out: dict[str, str] = {}
    for value in values:
        for addr, end in _bracketed(value):
            token = value[end:].lstrip(" \t\r\n").split(",", 1)[0].split("<", 1)[0].strip()
            if token:
                out[addr] = token
    return out
