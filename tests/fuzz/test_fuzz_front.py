"""The SMTP front's parsers on arbitrary input: command lines, MAIL FROM parameters, smtpd's EHLO reply and
the DATA stream.  What must hold whatever the client sends: no exception; REQUIRETLS never reaches smtpd
and is never granted without TLS; no forged carrier passes the header section; no early end of message."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from requiretls.front import protocol as p

from .support import FUZZ, SEPARATORS, tokens

CMD_WORDS = ["MAIL FROM:", "mail from:", "<a@b>", "<>", "<", ">", " REQUIRETLS", " requiretls", "REQUIRETLS=",
             " BODY=8BITMIME", " SIZE=1", "RCPT TO:", "EHLO ", "STARTTLS", "AUTH PLAIN", "\x00", "\xff", "é",
             *SEPARATORS]
DATA_WORDS = ["Require-TLS-ESMTP: yes", "require-tls-esmtp : yes", ".Require-TLS-ESMTP:yes", "REQUIRE-TLS-ESMTP",
              "Subject: x", " folded", "\tfolded", " ", ".", "..", ":", "From x", "", "body", "\r", "\x00"]


@FUZZ
@given(tokens(CMD_WORDS).map(lambda s: s.encode("utf-8", "surrogateescape")), st.booleans())
def test_mail_from_never_lets_requiretls_through(line: bytes, tls: bool) -> None:
    if p.command_error(line) is not None:
        return
    cmd = p.parse_command(line)
    m = p.mail_from(cmd, tls_active=tls)
    if m.error is None:
        if m.requiretls:
            # Granted only over TLS, and then no REQUIRETLS keyword is left among the parameters smtpd gets.
            assert tls
            params = m.line.split(b">", 1)[1].split()
            assert not [w for w in params if w.split(b"=", 1)[0].upper() == b"REQUIRETLS"]
    else:
        assert m.error[:3] in (b"555", b"501") and not m.requiretls


@FUZZ
@given(st.lists(st.sampled_from(["250-x", "250 x", "250-STARTTLS", "250-CHUNKING", "250-AUTH PLAIN",
                                 "250-REQUIRETLS", "250-SIZE 10", "550 no", "250-XCLIENT NAME"]), max_size=12),
       st.booleans(), st.booleans())
def test_ehlo_rewrite_offers_requiretls_only_after_tls(lines: list[str], tls: bool, auth_only: bool) -> None:
    block = "".join(ln + "\r\n" for ln in lines).encode()
    out = p.rewrite_ehlo(block, tls_active=tls, tls_offered=True, auth_only=auth_only)
    if block.startswith(b"250"):
        words = [ln[4:].split(b" ")[0] for ln in p.reply_lines(out)[1:]]
        assert (b"REQUIRETLS" in words) == tls
        assert b"CHUNKING" not in words and b"XCLIENT" not in words
        assert words.count(b"STARTTLS") == (0 if tls else 1)
        if auth_only and not tls:
            assert b"AUTH" not in words
        lines_out = p.reply_lines(out)
        assert all(ln[3:4] == b"-" for ln in lines_out[:-1]) and lines_out[-1][3:4] == b" "
    else:
        assert out == block


@FUZZ
@given(st.lists(tokens(DATA_WORDS).map(lambda s: s.encode("utf-8", "surrogateescape").replace(b"\n", b"")),
                max_size=20))
def test_data_stream_drops_every_carrier_in_the_header_section(lines: list[bytes]) -> None:
    s = p.DataStream()
    out = b""
    for ln in lines:
        if ln == b".":
            continue
        out += s.line(ln)
    out += s.line(b".")
    assert s.done and out.endswith(b"\r\n.\r\n" if out != b".\r\n" else b".\r\n")
    # The header section as Postfix reads it: every field up to the first empty or non-field line.
    head = []
    for ln in out[:-3].split(b"\r\n"):
        text = ln[1:] if ln.startswith(b".") else ln
        if text[:1] in (b" ", b"\t"):
            continue
        if not re.match(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:", text):
            break
        head.append(text.split(b":", 1)[0].strip(b" \t").lower())
    assert b"require-tls-esmtp" not in head
    assert b"\r\n.\r\n" not in b"\r\n" + out[:-3]


@FUZZ
@given(st.lists(st.tuples(st.one_of(st.sampled_from([b".", b"..", b"x", b"", b".x", b"\r", b".\r"]),
                                    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))),
                          st.booleans()),
                max_size=30))
def test_only_the_standard_end_of_data_ends_the_message(lines: list[tuple[bytes, bool]]) -> None:
    """A lone dot ends the message only on a CRLF line after a CRLF line; whatever the front forwards before it
    holds no CRLF . CRLF of its own, so smtpd ends where the front ends."""
    s = p.DataStream()
    out = b""
    prev = True
    for content, crlf in lines:
        out += s.line(content, crlf)
        if s.done:
            assert content == b"." and crlf and prev
            break
        prev = crlf
    body = out[:-3] if s.done else out
    assert b"\r\n.\r\n" not in b"\r\n" + body
    assert all(seg.endswith(b"\r") for seg in body.split(b"\n")[:-1])


def _line_by_line(chunks: list[bytes], limit: int) -> tuple[bytes, bytes, bool, int]:
    """What the front made of a DATA stream before blocks: one line (or one piece of a line longer than
    ``limit``) at a time through :meth:`DataStream.part`, reading a chunk whenever no line was whole."""
    s = p.DataStream()
    buf, out, first, rest = bytearray(), b"", True, iter(chunks)
    while not s.done:
        i = buf.find(b"\n")
        if i >= 0:
            raw, complete = bytes(buf[: i + 1]), True
            del buf[: i + 1]
        elif len(buf) >= limit:
            cut = limit - 1 if buf[limit - 1:limit] == b"\r" else limit
            raw, complete = bytes(buf[:cut]), False
            del buf[:cut]
        else:
            nxt = next(rest, None)
            if nxt is None:
                break
            buf += nxt
            continue
        content, ending = p.split_line(raw) if complete else (raw, b"")
        out += s.part(content, first=first, last=complete, crlf=ending == b"\r\n")
        first = complete
    return out, bytes(buf) + b"".join(rest), s.done, s.dropped


DATA_BYTES = [b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.\r\n", b".\r\n", b"Require-TLS-ESMTP: yes",
              b"rEQUIRE-tls-ESMTP:", b"Subject: x", b"\r\n ", b"\r\n\t", b":", b"x", b"xxxxxxxx", b"\r\n\r\n",
              b"MAIL FROM:<a@b>\r\n", b"\x00", b"\xff"]


@FUZZ
@given(st.lists(st.sampled_from(DATA_BYTES), max_size=40), st.lists(st.integers(1, 30), min_size=1, max_size=8),
       st.sampled_from([4, 9, 64, 65536]))
def test_blocks_forward_exactly_what_line_by_line_did(words: list[bytes], cuts: list[int], limit: int) -> None:
    """DataStream.take() (whole blocks where it can) against the line-by-line reading it replaced: the same
    bytes to smtpd, the same end of data, the same rest (the pipelined commands after it), the same carriers
    dropped, however the stream arrives in pieces and whatever the line length limit."""
    data = b"".join(words) + b"\r\n.\r\nQUIT\r\n"
    chunks, i, k = [], 0, 0
    while i < len(data):
        chunks.append(data[i:i + cuts[k % len(cuts)]])
        i += cuts[k % len(cuts)]
        k += 1
    want = _line_by_line(chunks, limit)
    s = p.DataStream()
    buf, out, n = bytearray(), b"", 0
    while not s.done and n < len(chunks):
        buf += chunks[n]
        n += 1
        out += s.take(buf, limit)
    got = (out, bytes(buf) + b"".join(chunks[n:]), s.done, s.dropped)
    assert got == want
    # And in one piece, as most messages come.
    s1 = p.DataStream()
    buf1 = bytearray(data)
    out1 = s1.take(buf1, 65536)
    assert (out1, bytes(buf1), s1.done, s1.dropped) == _line_by_line([data], 65536)
