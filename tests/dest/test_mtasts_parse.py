"""The MTA-STS parser module alone (RFC 8461 sections 3.1 and 3.2): pure functions, text in, values out."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import pytest

from requiretls.dest.errors import MtaStsPolicyError, MtaStsRecordError
from requiretls.dest.mtasts import parse
from requiretls.dest.mtasts.parse import (
    MAX_AGE_LIMIT,
    StsRecord,
    parse_policy,
    parse_sts_record,
    select_sts_record,
    valid_mx_pattern,
)
from requiretls.facts import StsMode, StsPolicy


def test_parser_module_imports_nothing_that_does_io() -> None:
    """The parser stays pure: no sockets, TLS, event loop, clock or cache among its imports."""
    tree = ast.parse(inspect.getsource(parse))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported == {"__future__", "re", "collections.abc", "dataclasses", "requiretls.facts", "..errors"}


def test_record_is_a_frozen_value() -> None:
    rec = parse_sts_record("v=STSv1; id=abc")
    assert rec == StsRecord("abc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.id = "x"  # type: ignore[misc]


def test_record_first_id_counts() -> None:
    """RFC 8461 section 3.1 leaves repeated fields open; the first ``id`` is kept, as for policy keys."""
    assert parse_sts_record("v=STSv1; id=first; id=second").id == "first"


def test_record_with_32_character_id_is_the_longest_accepted() -> None:
    """RFC 8461 section 3.1: ``sts-id = 1*32(ALPHA / DIGIT)``."""
    assert parse_sts_record("v=STSv1; id=" + "A1" * 16).id == "A1" * 16


def test_select_ignores_records_of_other_kinds_but_counts_every_stsv1() -> None:
    with pytest.raises(MtaStsRecordError, match="no v=STSv1"):
        select_sts_record(["v=spf1 -all", "google-site-verification=x"])
    with pytest.raises(MtaStsRecordError, match="exactly one"):
        select_sts_record(["v=STSv1; id=a", "v=STSv1; id=a"])


@pytest.mark.parametrize(("pattern", "ok"), [
    ("mx.example.com", True),
    ("*.example.com", True),
    ("example", True),
    ("xn--bcher-kva.example", True),
    ("*", False),
    ("*.", False),
    ("", False),
    ("mx.*.example.com", False),
    ("*mx.example.com", False),
    ("mx..example.com", False),
    ("-mx.example.com", False),
    ("mx_1.example.com", False),
    ("a" * 64 + ".example", False),
    (".".join(["a" * 63] * 4) + ".b", False),  # 254 characters
])
def test_mx_pattern_syntax(pattern: str, ok: bool) -> None:
    """RFC 8461 section 3.2: ``mx`` is a domain name in A-label form, the wildcard only as the left-most label."""
    assert valid_mx_pattern(pattern) is ok


def test_mx_patterns_are_lowercased_stripped_of_the_root_dot_and_deduplicated() -> None:
    p = parse_policy("version: STSv1\nmode: enforce\nmax_age: 60\nmx: MX.Example.COM.\nmx: mx.example.com\n"
                     "mx:\t*.backup.example.com \n")
    assert p.mx == ("mx.example.com", "*.backup.example.com")


def test_blank_lines_are_skipped_and_the_result_is_a_plain_policy() -> None:
    p = parse_policy("\n\nversion: STSv1\n\n  \nmode: testing\r\nmax_age: 0\nmx: a.test\n\n")
    assert p == StsPolicy(StsMode.TESTING, 0, ("a.test",))
    assert p.policy_id == "" and p.fetched_at == 0.0


def test_max_age_is_clamped_to_the_caller_limit_and_never_above_the_rfc_limit() -> None:
    text = "version: STSv1\nmode: enforce\nmax_age: 604800\nmx: a.test\n"
    assert parse_policy(text, max_age_limit=86400).max_age == 86400
    assert parse_policy(text, max_age_limit=MAX_AGE_LIMIT * 2).max_age == 604800
    big = "version: STSv1\nmode: enforce\nmax_age: 9999999999\nmx: a.test\n"
    assert parse_policy(big, max_age_limit=MAX_AGE_LIMIT * 2).max_age == MAX_AGE_LIMIT


def test_an_invalid_mx_line_spoils_the_whole_policy() -> None:
    with pytest.raises(MtaStsPolicyError, match="invalid mx pattern"):
        parse_policy("version: STSv1\nmode: enforce\nmax_age: 60\nmx: a.test\nmx: bad_name.test\n")


def test_same_text_gives_equal_policies() -> None:
    text = "version: STSv1\nmode: enforce\nmax_age: 60\nmx: a.test\n"
    assert parse_policy(text) == parse_policy(text)
