"""Every input the fuzz tests ever broke a parser with, pinned (issue 9: each crash gets a regression test)."""

from __future__ import annotations

from requiretls.policy.headers import parse_header_block
from requiretls.relay.agent import strip_private


def test_private_field_after_a_bare_lf_line_is_stripped_from_a_crlf_message() -> None:
    # Found by test_fuzz_lmtp: the CRLF split saw "\x00\nX-RequireTLS-Route:" as one line and kept the field.
    out = strip_private(b"\x00\nX-RequireTLS-Route: relay\r\n\r\nbody\r\n")
    assert out == b"\x00\n\r\nbody\r\n"


def test_header_section_ends_at_the_first_empty_line_whatever_its_line_ending() -> None:
    # A body line that looks like a private field (after an LF-only blank line) is body: left alone.
    msg = b"Subject: x\n\nX-RequireTLS-Route: relay\r\n\r\nmore\r\n"
    assert strip_private(msg) == msg


def test_message_with_only_private_fields_keeps_its_empty_line_and_body() -> None:
    assert strip_private(b"X-RequireTLS-Route: relay\r\n\tfolded\r\n\r\nbody") == b"\r\nbody"


def test_form_feed_or_line_separator_in_a_value_does_not_make_a_field() -> None:
    # Found by test_fuzz_lmtp: str.splitlines() split "Subject: a\x0cX-RequireTLS-Route: reinject" in two, so the
    # agent could read a route header that Postfix never saw as one.
    for sep in ("\x0b", "\x0c", "\x1c", "\x85", "\u2028"):
        raw = f"Subject: a{sep}X-RequireTLS-Route: reinject\r\nFrom: b\r\n\r\nbody".encode()
        assert [n for n, _ in parse_header_block(raw)] == ["Subject", "From"], sep


def test_crlf_and_lf_header_blocks_parse_alike() -> None:
    crlf = parse_header_block(b"A: 1\r\n\tx\r\nB: 2\r\n\r\nC: 3\r\n")
    assert crlf == parse_header_block(b"A: 1\n\tx\nB: 2\n\nC: 3\n") == (("A", "1\n\tx"), ("B", "2"))
