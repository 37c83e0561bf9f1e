"""8-bit to 7-bit conversion (requiretls.relay.mime): the decoded content is the original, byte for byte."""

from __future__ import annotations

import email
import email.policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from requiretls.relay.mime import Unconvertible, downconvert, has_8bit


def _decoded(raw: bytes) -> list[tuple[str, bytes | None]]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    return [(p.get_content_type(), p.get_payload(decode=True)) for p in msg.walk() if not p.is_multipart()]


MULTI = ("From: a@b\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XX\"\r\n\r\npre\r\n"
         "--XX\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nHällo\r\n"
         "--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: 8bit\r\n\r\n").encode() \
    + b"\xff\xfe binary\r\n" + (
        "--XX\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        "Subject: inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\ninnen ü\r\n"
        "--XX\r\nContent-Type: text/plain\r\n\r\nplain ascii\r\n--XX--\r\n").encode()


def test_multipart_parts_are_converted_and_decode_to_the_original() -> None:
    out = downconvert(MULTI)
    assert not has_8bit(out)
    assert _decoded(out) == _decoded(MULTI)
    assert b"Content-Type: text/plain\r\n\r\nplain ascii\r\n" in out  # a 7-bit part is left as it was
    assert b"Content-Transfer-Encoding: base64" in out


def test_message_without_mime_headers_gets_them() -> None:
    raw = "From: a@b\nSubject: x\n\nnaïve\n".encode()
    out = downconvert(raw)
    assert b"MIME-Version: 1.0\nContent-Transfer-Encoding: quoted-printable\n\nna=C3=AFve\n" in out
    assert _decoded(out) == _decoded(raw)


@pytest.mark.parametrize(("raw", "why"), [
    (MULTI.replace(b"multipart/mixed", b"multipart/signed"), "signature"),
    ("Subject: Grüße\r\n\r\nbody ü\r\n".encode(), "header"),
    (MULTI.replace(b"pre\r\n", "prä\r\n".encode()), "preamble"),
])
def test_unconvertible(raw: bytes, why: str) -> None:
    with pytest.raises(Unconvertible, match=why):
        downconvert(raw)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=8),
       st.sampled_from(["text/plain; charset=utf-8", "application/octet-stream"]))
def test_any_body_round_trips(lines: list[bytes], ctype: str) -> None:
    body = b"\r\n".join(lines) + b"\r\n"
    raw = (f"From: a@b\r\nMIME-Version: 1.0\r\nContent-Type: {ctype}\r\n"
           "Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + body
    out = downconvert(raw)
    assert not has_8bit(out)
    (kind, payload), = _decoded(out)
    assert payload is not None
    # the decoded body is the original (line breaks as the decoder gives them back)
    assert payload.replace(b"\r\n", b"\n") == body.replace(b"\r\n", b"\n"), (kind, out)
