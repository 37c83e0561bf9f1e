"""The SMTP front's protocol rules, free of I/O: what it changes in the dialogue between a client and Postfix's
smtpd, and nothing else.

* :func:`parse_command` splits a command line; :func:`command_error` says why a line is refused before it
  reaches Postfix (too long, NUL, not ASCII in the verb).
* :func:`rewrite_ehlo` turns smtpd's EHLO reply into the one the client sees: STARTTLS offered by the front
  (before TLS), REQUIRETLS after it (RFC 8689 §2: only on a TLS session), CHUNKING and the keywords smtpd has
  no business offering through the front removed, AUTH hidden before TLS when the site wants AUTH over TLS
  only.
* :func:`mail_from` finds and removes the ``REQUIRETLS`` parameter of ``MAIL FROM`` (the front is the only one
  who understands it; smtpd < 3.11 would answer 555).
* :class:`DataStream` passes the message through, line by line: every line leaves with CRLF, and only the
  standard end of data (a lone dot on a CRLF line after a CRLF line) ends the message; a dot line that a bare
  LF touches is content, passed on dot-stuffed (Postfix's ``smtpd_forbid_bare_newline = normalize`` reads it
  so too).  smtpd only ever sees CRLF, so the front and smtpd can never disagree about where the message ends,
  and a sender that took ``<LF>.<LF>`` for content cannot have a second message read out of it (no
  smuggling).  Inside the header section every ``Require-TLS-ESMTP`` field the client sent is removed,
  dot-stuffed or folded; the front's own fields go first.
* :func:`proxy_v2` builds the PROXY protocol v2 header that tells smtpd the real client address.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

#: Postfix's ``line_length_limit`` default: smtpd refuses longer command lines.
LINE_LIMIT = 2048
#: The most EHLO reply lines the front forwards (smtpd sends about 12).
EHLO_LINES_LIMIT = 64
#: The carrier header Postfix 3.11 itself uses for REQUIRETLS, read by our milter from the front's smtpd.
CARRIER = b"Require-TLS-ESMTP"
#: Keywords the front never lets through from smtpd's EHLO reply: it does STARTTLS itself, it does not
#: implement BDAT (a chunk is binary: the front could not keep its view of the message boundary), and the
#: XCLIENT/XFORWARD of the loopback smtpd are for the front's own neighbours, not for the client.
_DROP = frozenset({b"STARTTLS", b"CHUNKING", b"REQUIRETLS", b"XCLIENT", b"XFORWARD"})
#: Commands RFC 2920 §3.1 says end a pipelined group: after them the client waits for the reply.
GROUP_END = frozenset({"EHLO", "HELO", "DATA", "VRFY", "EXPN", "TURN", "QUIT", "NOOP", "STARTTLS", "AUTH"})


@dataclass(frozen=True, slots=True)
class Command:
    verb: str
    arg: str
    raw: bytes


def command_error(line: bytes) -> bytes | None:
    """The reply for a command line the front refuses outright, else None.  ``line`` has no line ending."""
    if len(line) > LINE_LIMIT:
        return b"500 5.5.2 Error: command line too long\r\n"
    if b"\0" in line:
        return b"500 5.5.2 Error: command contains a NUL character\r\n"
    verb = line.split(b" ", 1)[0]
    if not verb.isascii():
        return b"500 5.5.2 Error: bad UTF-8 syntax\r\n"
    return None


def parse_command(line: bytes) -> Command:
    """``line`` without its line ending.  The verb is upper-cased; the argument is kept as sent (UTF-8 with the
    bytes that are not decoded as surrogate escapes, so that they go to smtpd exactly as they came)."""
    text = line.decode("utf-8", "surrogateescape")
    verb, _, arg = text.strip(" \t").partition(" ")
    return Command(verb.upper(), arg.lstrip(" "), line)


def reply_lines(block: bytes) -> list[bytes]:
    """The lines of one (possibly multi-line) reply, without line endings."""
    return [ln for ln in block.split(b"\r\n") if ln]


def reply_code(block: bytes) -> int:
    try:
        return int(block[:3])
    except ValueError:
        return 0


def rewrite_ehlo(block: bytes, *, tls_active: bool, tls_offered: bool, auth_only: bool) -> bytes:
    """smtpd's EHLO reply as the front's client sees it.  A non-2xx reply goes through unchanged."""
    lines = reply_lines(block)
    if not lines or not lines[0].startswith(b"250"):
        return block
    code = lines[0][:3]
    keep = [lines[0][4:]]
    for ln in lines[1:EHLO_LINES_LIMIT]:
        text = ln[4:]
        word = text.split(b" ", 1)[0].split(b"=", 1)[0].upper()
        if word in _DROP:
            continue
        if word == b"AUTH" and auth_only and not tls_active:
            continue
        keep.append(text)
    if tls_offered and not tls_active:
        keep.append(b"STARTTLS")
    if tls_active:
        keep.append(b"REQUIRETLS")
    out = [code + (b" " if i == len(keep) - 1 else b"-") + t for i, t in enumerate(keep)]
    return b"\r\n".join(out) + b"\r\n"


_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(=[!-<>-~]*)?$")


@dataclass(frozen=True, slots=True)
class MailFrom:
    """``MAIL FROM`` as the front forwards it: ``line`` without ``REQUIRETLS``; ``requiretls`` set when the
    client asked for it; ``error`` a reply that refuses the command instead."""

    line: bytes
    requiretls: bool
    error: bytes | None = None


def mail_from(cmd: Command, *, tls_active: bool) -> MailFrom:
    """Find ``REQUIRETLS`` among the ``MAIL FROM`` parameters (RFC 8689 §2: no value; only on TLS).  The address
    is left exactly as sent: smtpd judges it."""
    arg = cmd.arg
    if arg[:5].upper() != "FROM:":
        return MailFrom(cmd.raw, False)
    rest = arg[5:].lstrip(" ")
    end = rest.find(">")
    if not rest.startswith("<") or end < 0:
        # Parameters need the address in angle brackets (RFC 5321 §4.1.2): without them the line goes to
        # smtpd as it is, which refuses an unknown REQUIRETLS (555) like any Postfix before 3.11.
        return MailFrom(cmd.raw, False)
    addr, params = rest[: end + 1], rest[end + 1:]
    words = params.split()
    hits = [w for w in words if w.split("=", 1)[0].upper() == "REQUIRETLS"]
    if not hits:
        return MailFrom(cmd.raw, False)
    if not tls_active:
        # What Postfix 3.11 answers, and what RFC 8689 §2 asks: the keyword was not offered.
        return MailFrom(cmd.raw, False, b"555 5.5.4 REQUIRETLS requires a TLS session\r\n")
    if len(hits) > 1 or "=" in hits[0]:
        return MailFrom(cmd.raw, False, b"501 5.5.4 Bad REQUIRETLS parameter syntax\r\n")
    kept = [w for w in words if w is not hits[0]]
    line = "MAIL FROM:" + addr + "".join(" " + w for w in kept)
    return MailFrom(line.encode("utf-8", "surrogateescape"), True)


def split_line(data: bytes) -> tuple[bytes, bytes]:
    """A line read up to and including ``\\n``: (content, ending) with the ending ``\\r\\n`` or ``\\n`` (or b""
    at end of stream).  A CR not followed by LF stays part of the content, as in Postfix."""
    if data.endswith(b"\r\n"):
        return data[:-2], b"\r\n"
    if data.endswith(b"\n"):
        return data[:-1], b"\n"
    return data, b""


_CARRIER_LOWER = CARRIER.lower()
_HEADER_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


class DataStream:
    """One message's DATA, from the client to smtpd.  :meth:`part` takes each line, or each piece of a line too
    long to hold (``first``: the piece starts the line; ``last``: it ends it), without the line ending, and
    returns the bytes to forward; :attr:`done` is set by the lone dot.

    The header section ends, as in Postfix's cleanup, at the empty line or at the first line that is neither
    a field nor a continuation.  A field whose name is ``Require-TLS-ESMTP`` (any case, with or without
    blanks before the colon, behind a stuffing dot) is dropped with its continuation lines: only the front
    says that REQUIRETLS was given.  Wherever the front cannot tell (a line so long that its start shows no
    colon), it stays in the header section: it must never read "body" where Postfix still reads headers."""

    __slots__ = ("done", "dropped", "dropping", "in_header", "mid_line", "prev_crlf", "scanned")

    def __init__(self) -> None:
        self.done = False
        self.in_header = True
        self.dropping = False
        self.dropped = 0
        self.prev_crlf = True
        #: :meth:`take` passed on the start of a line too long to hold, and not yet its end.
        self.mid_line = False
        #: How much of the buffer :meth:`take` found without a line end (searched from there next time).
        self.scanned = 0

    def take(self, buf: bytearray, limit: int) -> bytes:
        """Everything :meth:`part` makes of the lines that ``buf`` holds whole (and of the pieces of a line
        longer than ``limit``), taken out of ``buf``; what is left is the start of a line, or what follows the
        end of data.

        Where the result is known without going line by line, whole blocks pass at once (:meth:`_plain`):
        lines that all end with CRLF (no bare LF among them; a CR without LF is content either way) come out
        of :meth:`part` exactly as they went in, up to and including the first lone dot.  In the header section that is
        only so when no ``Require-TLS-ESMTP`` appears in the block, and the block is only taken there when it
        reaches the end of data (where the header section ends need not be known then).  Every other case
        goes line by line.  One attempt at a block per call, and one more where the body starts: a call costs
        a bounded number of passes over ``buf``, whatever it holds."""
        out: list[bytes] = []
        tried = False
        while not self.done:
            i = buf.find(b"\n", self.scanned)
            if i < 0:
                if len(buf) < limit:
                    # Nothing whole yet: the next call looks only at what arrives after this (a line that comes
                    # a byte at a time is not searched from its start again and again).
                    self.scanned = len(buf)
                    break
                # Never split between CR and LF.
                cut = limit - 1 if buf[limit - 1:limit] == b"\r" else limit
                piece = bytes(buf[:cut])
                del buf[:cut]
                self.scanned = 0
                out.append(self.part(piece, first=not self.mid_line, last=False))
                self.mid_line = True
                continue
            if not self.mid_line and not tried:
                tried = True
                n = self._plain(buf)
                if n:
                    out.append(bytes(buf[:n]))
                    del buf[:n]
                    self.scanned = 0
                    # (_plain() leaves only the start of a line, or what follows the end of data.)
                    continue
            raw = bytes(buf[: i + 1])
            del buf[: i + 1]
            self.scanned = 0
            content, ending = split_line(raw)
            header = self.in_header
            out.append(self.part(content, first=not self.mid_line, last=True, crlf=ending == b"\r\n"))
            self.mid_line = False
            if header and not self.in_header:
                tried = False  # the body starts here: one more attempt
        return b"".join(out)

    def _plain(self, buf: bytearray) -> int:
        """How many bytes at the start of ``buf`` (at the start of a line) pass unchanged as one block; 0 when
        that cannot be told without going line by line.  Sets :attr:`done` when the block holds the end."""
        if self.dropping or not self.prev_crlf:
            return 0
        last = buf.rfind(b"\n") + 1
        if not last:
            return 0
        found = True
        if buf.startswith(b".\r\n"):
            stop = 3
        else:
            i = buf.find(b"\r\n.\r\n", 0, last)
            if i >= 0:
                stop = i + 5
            elif self.in_header:
                return 0
            else:
                stop, found = last, False
        region = buf[:stop]
        if region.count(b"\r\n") != region.count(b"\n"):
            return 0
        if self.in_header and _CARRIER_LOWER in region.lower():
            return 0
        self.done = found
        return stop

    def line(self, content: bytes, crlf: bool = True) -> bytes:
        return self.part(content, first=True, last=True, crlf=crlf)

    def part(self, content: bytes, *, first: bool, last: bool, crlf: bool = True) -> bytes:
        """``crlf``: the line ended with CRLF (not a bare LF); only with ``last``."""
        end = b"\r\n" if last else b""
        if first and last and content == b".":
            if crlf and self.prev_crlf:
                self.done = True
                return b".\r\n"
            # <LF>.<LF>, <LF>.<CR><LF>, <CR><LF>.<LF>: not the end of data; content, kept a dot for smtpd.
            content = b".."
        if last:
            self.prev_crlf = crlf
        if self.in_header:
            if not first:
                return b"" if self.dropping else content + end
            text = content[1:] if content.startswith(b".") else content
            if text[:1] in (b" ", b"\t"):
                # A continuation, even one of blanks only (Postfix's MIME state machine reads it so); at the
                # top of the header section it continues nothing, and the front stays in the header section
                # rather than risk reading "body" where Postfix still reads headers.
                if self.dropping:
                    return b""
            elif (m := _HEADER_NAME.match(text)) is not None:
                self.dropping = m.group(1).lower() == CARRIER.lower()
                if self.dropping:
                    self.dropped += 1
                    return b""
            elif not last and text:
                self.dropping = False
            else:
                self.in_header = False
                self.dropping = False
        return content + end


def header_block(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Fields the front puts at the top of a message, dot-stuffed where needed (a value never starts a line
    with a dot here, but a name could in principle)."""
    out = b""
    for name, value in fields:
        ln = name + b": " + value
        out += (b"." + ln if ln.startswith(b".") else ln) + b"\r\n"
    return out


_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """The PROXY protocol v2 header for a TCP connection from ``src`` to ``dst`` (Postfix >= 3.5 reads it with
    ``smtpd_upstream_proxy_protocol = haproxy``).  An IPv4-mapped IPv6 address is sent as IPv4, as a client
    connecting over IPv4 to a dual-stack socket appears to Postfix without the front."""
    s = ipaddress.ip_address(src[0].split("%", 1)[0])
    d = ipaddress.ip_address(dst[0].split("%", 1)[0])
    if isinstance(s, ipaddress.IPv6Address) and s.ipv4_mapped is not None:
        s = s.ipv4_mapped
    if isinstance(d, ipaddress.IPv6Address) and d.ipv4_mapped is not None:
        d = d.ipv4_mapped
    if s.version != d.version:
        # A client over IPv4 to an IPv6 listener without mapping cannot happen; say so rather than lie.
        d = ipaddress.ip_address("0.0.0.0") if s.version == 4 else ipaddress.ip_address("::")
    fam = 0x11 if s.version == 4 else 0x21
    body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    return _SIG + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body
