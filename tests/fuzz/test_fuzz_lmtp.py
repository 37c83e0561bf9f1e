"""What the delivery agent reads from Postfix over LMTP: the message (our private header fields stripped) and
the MAIL / RCPT arguments with DSN parameters."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from requiretls.policy.headers import parse_header_block
from requiretls.relay.agent import _PRIVATE, _take_params, private_conflict, strip_private, valid_argument

from .support import FUZZ, SEPARATORS, tokens

MSG_WORDS = ["X-RequireTLS-Route: relay", "x-requiretls-handback: 1", "X-RequireTLS-Route:", "Subject: hi",
             "From: a@b", " folded", "\tfolded", "\r\n", "\n", "\r\n\r\n", "\n\n", "body", ":", "\x00", "\xff"]
ARG_WORDS = ["<a@b>", "<>", "<", ">", "RET=HDRS", "ret=full", "ENVID=x", "NOTIFY=NEVER", "ORCPT=rfc822;a@b", "RET",
             "RET=", "SIZE=10", "BODY=8BITMIME", "=", *SEPARATORS]
NAMES = ("RET", "ENVID", "NOTIFY", "ORCPT")


def _fields(message: bytes) -> list[str]:
    return [n.lower() for n, _ in parse_header_block(message)]


@FUZZ
@given(st.one_of(st.binary(max_size=400), tokens(MSG_WORDS).map(lambda s: s.encode("latin-1", "replace"))))
def test_strip_private_removes_only_private_fields_and_keeps_the_body(message: bytes) -> None:
    out = strip_private(message)
    m = re.search(rb"\n\r?\n", message)
    if m is None:
        assert out == message
        return
    assert out.endswith(message[m.start() + 1 :])
    assert not [n for n in _fields(out) if n in _PRIVATE]
    assert _fields(out) == [n for n in _fields(message) if n not in _PRIVATE]


@FUZZ
@given(st.one_of(st.none(), st.text(max_size=80), tokens(ARG_WORDS)))
def test_take_params_splits_any_argument(arg: str | None) -> None:
    rest, taken = _take_params(arg, NAMES)
    assert set(taken) <= set(NAMES)
    if arg and ">" in arg:
        assert rest is not None and rest.startswith(arg[: arg.rfind(">") + 1])
    else:
        assert rest == arg and taken == {}


@FUZZ
@given(st.one_of(st.binary(max_size=120), tokens(ARG_WORDS).map(lambda s: s.encode("utf-8", "surrogatepass"))))
def test_mail_and_rcpt_arguments_with_controls_or_bytes_that_are_not_utf8_are_refused(raw: bytes) -> None:
    # As aiosmtpd decodes a command line (surrogateescape); issue 17: MAIL FROM:<a\0@b> was accepted.
    arg = raw.decode("utf-8", "surrogateescape")
    bad = any(c < " " or "\x7f" <= c <= "\x9f" or "\ud800" <= c <= "\udfff" for c in arg)
    assert valid_argument(arg) is (not bad or not arg)


@FUZZ
@given(st.one_of(st.binary(max_size=400), tokens(MSG_WORDS).map(lambda s: s.encode("latin-1", "replace"))))
def test_a_message_with_two_fields_of_one_private_name_is_always_a_conflict(message: bytes) -> None:
    names = _fields(message)
    twice = any(names.count(n) > 1 for n in _PRIVATE)
    assert (private_conflict(parse_header_block(message)) is not None) is twice
