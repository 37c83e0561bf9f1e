"""TLS-Required (RFC 8689 §5), Require-TLS-ESMTP and Subject cookie parsing, and decide() over arbitrary
header sections and envelopes: never an exception, and a class always comes out."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from requiretls.policy import (
    Envelope,
    LocalPolicy,
    MessageClass,
    MessageFacts,
    OptoutFrom,
    PolicyTable,
    Session,
    decide,
)
from requiretls.policy.headers import (
    decode_subject,
    encode_subject,
    find_cookie,
    parse_header_block,
    parse_tls_required,
    remove_cookie,
    require_tls_esmtp,
    unfold,
)

from .support import FUZZ, SEPARATORS, tokens

HEADER_WORDS = ["No", "no", "yes", "YES", "(comment)", "=?utf-8?b?", "=?utf-8?q?", "=?iso-8859-1?Q?", "?=", "=C3=A9",
                "W3JlcXVpcmV0bHNd", "[requiretls]", "[tls-optout]", "[REQUIRETLS]", "Re:", "_", "=?", "?", *SEPARATORS]
NAMES = ["TLS-Required", "tls-required", "Subject", "subject", "Require-TLS-ESMTP", "X-RequireTLS-Route",
         "X-RequireTLS-Handback", "From", "To", "X-Original-TLS-Required"]
values = st.one_of(st.text(max_size=60), tokens(HEADER_WORDS))
headers = st.lists(st.tuples(st.one_of(st.sampled_from(NAMES), st.text(max_size=12)), values), max_size=8)
TABLE = PolicyTable.parse("a.example requiretls=yes\nb.example optout=no\n.example dane optout=yes\n", "policy")
SENDERS = PolicyTable.parse("alice@a.example requiretls=yes\n@b.example optout=yes\n<> optout=no\n", "senders",
                            "sender")


@FUZZ
@given(headers)
def test_header_parsers_accept_any_header_section(hs: list[tuple[str, str]]) -> None:
    t = parse_tls_required(tuple(hs))
    assert t.state is not None
    assert isinstance(require_tls_esmtp(tuple(hs)), bool)
    for _, v in hs:
        assert isinstance(unfold(v), str)


@FUZZ
@given(values, st.sampled_from(["[requiretls]", "[tls-optout]", "[x]", "requiretls"]))
def test_subject_decode_cookie_and_encode_never_fail(value: str, cookie: str) -> None:
    text, _ = decode_subject(value)
    i = find_cookie(text, cookie)
    out = remove_cookie(text, cookie)
    if i < 0:
        assert find_cookie(out, cookie) < 0 or out == text
    enc = encode_subject(out)
    assert isinstance(enc, str)


@FUZZ
@given(st.one_of(st.binary(max_size=400), tokens(HEADER_WORDS + [f"{n}:" for n in NAMES]).map(str.encode)))
def test_parse_header_block_returns_pairs_for_any_bytes(raw: bytes) -> None:
    for name, value in parse_header_block(raw):
        assert name and name == name.strip() and ":" not in name
        assert isinstance(value, str)


@FUZZ
@given(headers, st.one_of(st.text(max_size=30), st.sampled_from(["", "<>", "alice@a.example", "x@b.example"])),
       st.lists(st.one_of(st.text(max_size=30), st.sampled_from(["u@a.example", "v@b.example", "w@c.example"])),
                min_size=1, max_size=4),
       st.lists(st.one_of(st.text(max_size=15), st.sampled_from(["REQUIRETLS", "RET=FULL", "SIZE=1"])), max_size=3),
       st.sampled_from(list(OptoutFrom)),
       st.one_of(st.none(), st.text(max_size=20), st.sampled_from(["127.0.0.1", "::1", "IPv6:::1", "192.0.2.1"])),
       st.one_of(st.none(), st.text(max_size=8)))
def test_decide_classifies_any_message(hs: list[tuple[str, str]], sender: str, rcpts: list[str], params: list[str],
                                       optout_from: OptoutFrom, ip: str | None, sasl: str | None) -> None:
    policy = LocalPolicy(table=TABLE, senders=SENDERS, optout_from=optout_from)
    facts = MessageFacts(Envelope(sender, tuple(rcpts), tuple(params)), Session(sasl, ip), tuple(hs))
    d = decide(facts, policy)
    assert isinstance(d.msg_class, MessageClass)
    assert len(d.recipients) == len(rcpts)
    if any(p.upper() == "REQUIRETLS" for p in params) and sender.strip("<> "):
        assert d.msg_class is MessageClass.REQUIRETLS
