"""MTA-STS TXT records and policy files (RFC 8461 §3.1, §3.2) from arbitrary DNS / HTTPS content: a parse
either succeeds with a sane result or raises the module's own error, nothing else."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from requiretls.dest.mtasts import (
    MtaStsPolicyError,
    MtaStsRecordError,
    StsMode,
    parse_policy,
    parse_sts_record,
    select_sts_record,
)

from .support import FUZZ, SEPARATORS, tokens

TXT_WORDS = ["v=STSv1", "v=STSv2", "v=", "id=", "20261123T000000", "abc", "x" * 33, "; ", ";", "ext=1", "=", "v",
             "id", " ", "\t", "STSv1"]
POLICY_WORDS = ["version: STSv1", "mode: enforce", "mode: testing", "mode: none", "mode: bogus", "max_age: 86400",
                "max_age: 99999999999", "max_age: -1", "max_age: 1e3", "mx: mx.example.com", "mx: *.example.net",
                "mx: *.*.x", "mx: ", "mx:", "version:STSv1", ":", "\n", "\r\n", "\r", "\ufeff", "\x00", " ", "٣",
                *SEPARATORS]
txt = st.one_of(st.text(max_size=80), tokens(TXT_WORDS))
policy = st.one_of(st.text(max_size=300), tokens(POLICY_WORDS),
                   st.lists(st.sampled_from(POLICY_WORDS[:10]), max_size=10).map("\n".join))


@FUZZ
@given(txt)
def test_parse_sts_record_returns_a_record_or_raises_record_error(text: str) -> None:
    try:
        rec = parse_sts_record(text)
    except MtaStsRecordError:
        return
    assert rec.id and len(rec.id) <= 32 and rec.id.isascii() and rec.id.isalnum()


@FUZZ
@given(st.lists(txt, max_size=4))
def test_select_sts_record_picks_exactly_one_or_raises_record_error(texts: list[str]) -> None:
    try:
        select_sts_record(texts)
    except MtaStsRecordError:
        return


@FUZZ
@given(policy)
def test_parse_policy_returns_a_policy_or_raises_policy_error(text: str) -> None:
    try:
        p = parse_policy(text)
    except MtaStsPolicyError:
        return
    assert isinstance(p.mode, StsMode) and p.max_age >= 0
    assert p.mode is StsMode.NONE or p.mx
    for mx in p.mx:
        p.matches(mx)
    p.matches("mx.example.com")
