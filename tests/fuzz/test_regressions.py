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


# --- issue 17: hostile header bytes (found by miltertest and a raw milter client) -----------------------------
# The milter decodes header values with surrogateescape: a byte that is not UTF-8 arrives as a lone surrogate.

def test_subject_with_a_byte_that_is_not_utf8_encodes_to_writable_unknown_8bit_words() -> None:
    from requiretls.policy.headers import decode_subject, encode_subject, remove_cookie, writable

    text, _ = decode_subject("[tls-optout] caf\udce9")
    out = encode_subject(remove_cookie(text, "[tls-optout]"))
    assert writable(out) and out == "=?unknown-8bit?q?caf=E9?="
    long = encode_subject("\udce9" * 500)
    assert writable(long) and all(len(line) <= 998 for line in long.split("\n"))
    assert all(len(w) <= 75 for w in long.split())


def test_original_tls_required_that_is_not_utf8_is_malformed_and_never_written_back() -> None:
    from requiretls.policy import Envelope, LocalPolicy, MessageFacts, Session
    from requiretls.policy.decide import decide_classes
    from requiretls.policy.headers import writable

    for name in ("X-Original-TLS-Required", "TLS-Required"):
        facts = MessageFacts(Envelope("a@b.example", ("c@d.example",), ()), Session(None, "192.0.2.1", None),
                             ((name, "No\udce9"),))
        d = decide_classes(facts, LocalPolicy())
        assert str(d.msg_class) == "default"
        assert all(writable(e.value) for e in d.header_edits)
        assert not [e for e in d.header_edits if e.name == "TLS-Required" and e.action == "add"]
        assert not [e for e in d.header_edits if e.name == "X-Original-TLS-Required"]


def test_8bit_subject_with_optout_cookie_from_a_sasl_user_gives_writable_edits_only() -> None:
    from requiretls.policy import Envelope, LocalPolicy, MessageFacts, Session
    from requiretls.policy.decide import decide_classes
    from requiretls.policy.headers import writable

    for cookie in ("[tls-optout]", "[requiretls]"):
        facts = MessageFacts(Envelope("a@b.example", ("c@d.example",), ()), Session("alice", "192.0.2.1", None),
                             (("Subject", f"{cookie} caf\udce9"), ("X-Original-TLS-Required", "x\udcff")))
        d = decide_classes(facts, LocalPolicy())
        assert str(d.msg_class) in ("optout", "requiretls")
        subject = [e for e in d.header_edits if e.name == "Subject"]
        assert subject and subject[0].value == "=?unknown-8bit?q?caf=E9?="
        assert all(writable(e.value) for e in d.header_edits)


def test_log_fields_escape_line_breaks_and_bytes_that_are_not_utf8() -> None:
    from requiretls.log import kv

    line = kv(**{"from": "<a\n2026 forged: x@b>", "reason": "caf\udce9"})
    assert "\n" not in line and line.encode("utf-8")
