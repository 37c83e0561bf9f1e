"""8-bit to 7-bit conversion for an MX that does not offer 8BITMIME (RFC 6152 section 3; RFC 2045 section 6).

Like Postfix's smtp client, only the MIME parts whose body has 8-bit bytes change: their body is re-encoded
(quoted-printable for text/* and for a message without MIME structure, base64 for other types) and their
Content-Transfer-Encoding says so; every other byte of the message stays as it was, so the decoded content is
the original.  A ``message/rfc822`` part is converted inside and becomes 7bit.

Conversion is refused (:class:`Unconvertible`, the agent bounces 5.6.3) where it cannot keep the message
intact: 8-bit bytes in a header field (that needs SMTPUTF8 or RFC 2047 encoding, which would alter what a
signature covers), in a multipart preamble or epilogue, or anywhere inside ``multipart/signed`` or
``multipart/encrypted`` (RFC 1847: re-encoding a signed part breaks the signature; the sender must get it back
instead of the recipient getting a message whose signature fails).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re

_EIGHT_BIT = re.compile(rb"[\x80-\xff]")
_BLANK = re.compile(rb"\r?\n\r?\n")
_PARAM = re.compile(rb'boundary\s*=\s*(?:"([^"]+)"|([^\s;]+))', re.IGNORECASE)
_PROTECTED = (b"multipart/signed", b"multipart/encrypted")


class Unconvertible(Exception):
    """The message cannot be made 7-bit without damage; the text says why (for the bounce)."""


def has_8bit(data: bytes) -> bool:
    return _EIGHT_BIT.search(data) is not None


def _split(entity: bytes) -> tuple[bytes, bytes, bytes]:
    """(header block, separator, body) of an entity; no blank line: all header."""
    m = _BLANK.search(entity)
    if m is None:
        if entity.startswith((b"\r\n", b"\n")):  # no header at all
            nl = b"\r\n" if entity.startswith(b"\r\n") else b"\n"
            return b"", nl, entity[len(nl):]
        return entity, b"", b""
    return entity[: m.start()], entity[m.start() : m.end()], entity[m.end() :]


def _fields(head: bytes) -> list[bytes]:
    """Header fields with their continuation lines, each as written (line endings kept inside)."""
    out: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += line
        else:
            out.append(line)
    return out


def _value(fields: list[bytes], name: bytes) -> bytes | None:
    for f in fields:
        n, sep, v = f.partition(b":")
        if sep and n.strip().lower() == name:
            return b" ".join(v.split())
    return None


def _set_cte(fields: list[bytes], cte: bytes, nl: bytes, top: bool) -> list[bytes]:
    kept = [f for f in fields if f.partition(b":")[0].strip().lower() != b"content-transfer-encoding"]
    if kept and not kept[-1].endswith(b"\n"):
        kept[-1] += nl
    new = [*kept, b"Content-Transfer-Encoding: " + cte + nl]
    if top and _value(fields, b"mime-version") is None:
        new.insert(len(kept), b"MIME-Version: 1.0" + nl)
    return new


def _qp(body: bytes, nl: bytes) -> bytes:
    lines = body.split(nl)
    out = []
    for line in lines:
        enc = binascii.b2a_qp(line, quotetabs=False, istext=False, header=False)
        if line.endswith((b" ", b"\t")) and not enc.endswith((b"=20", b"=09")):
            enc = enc[:-1] + (b"=20" if line.endswith(b" ") else b"=09")
        out.append(enc.replace(b"=\n", b"=" + nl) if nl != b"\n" else enc)
    return nl.join(out)


def _b64(body: bytes, nl: bytes) -> bytes:
    text = base64.encodebytes(body)  # 76-character lines ending in \n
    return text.replace(b"\n", nl) if nl != b"\n" else text


def _entity(entity: bytes, top: bool, protected: bool) -> bytes:
    head, sep, body = _split(entity)
    nl = b"\r\n" if b"\r\n" in (sep or head[:200] or b"\n") else b"\n"
    if has_8bit(head):
        raise Unconvertible("8-bit bytes in a header field")
    if not has_8bit(body):
        return entity
    if protected:
        raise Unconvertible("8-bit content inside multipart/signed or multipart/encrypted: re-encoding it would "
                            "break the signature")
    fields = _fields(head)
    ctype = (_value(fields, b"content-type") or b"text/plain").lower()
    kind = ctype.split(b";", 1)[0].strip()
    if kind.startswith(b"multipart/"):
        m = _PARAM.search(_value(fields, b"content-type") or b"")
        if m is None:
            raise Unconvertible("multipart without a boundary")
        boundary = m.group(1) or m.group(2)
        return head + sep + _multipart(body, boundary, kind in _PROTECTED)
    if kind == b"message/rfc822":
        inner = _entity(body, False, protected)
        return b"".join(_set_cte(fields, b"7bit", nl, top)) + nl + inner
    if kind.startswith(b"text/") or (top and _value(fields, b"mime-version") is None):
        cte, encoded = b"quoted-printable", _qp(body, nl)
    else:
        cte, encoded = b"base64", _b64(body, nl)
    # The header block's last field now ends with its line break: one more makes the blank line.
    return b"".join(_set_cte(fields, cte, nl, top)) + nl + encoded


def _multipart(body: bytes, boundary: bytes, protected: bool) -> bytes:
    delim = re.compile(rb"(^|\r?\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r?\n|$)")
    pieces: list[bytes] = []
    parts: list[tuple[int, int]] = []
    matches = list(delim.finditer(body))
    if not matches:
        raise Unconvertible("multipart body without its boundary")
    preamble = body[: matches[0].start()]
    if has_8bit(preamble):
        raise Unconvertible("8-bit bytes in a multipart preamble")
    for a, b in itertools.pairwise(matches):
        parts.append((a.end(), b.start()))
    last = matches[-1]
    epilogue = body[last.end():]
    if has_8bit(epilogue):
        raise Unconvertible("8-bit bytes in a multipart epilogue")
    pieces.append(preamble)
    for (start, end), m in zip(parts, matches, strict=False):
        pieces.append(body[m.start() : m.end()])
        part = body[start:end]
        lead = b"\r\n" if part.startswith(b"\r\n") else b"\n" if part.startswith(b"\n") else b""
        pieces.append(lead + _entity(part[len(lead):], False, protected))
    pieces.append(body[last.start() : last.end()])
    pieces.append(epilogue)
    return b"".join(pieces)


def downconvert(message: bytes) -> bytes:
    """The message with every 8-bit body part re-encoded to 7 bits; raises :class:`Unconvertible`."""
    return _entity(message, True, False)
