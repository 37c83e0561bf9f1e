"""RFC 8689 §3 / §4.1: the TLS-Required header field, and the REQUIRETLS parameter winning over it."""

from __future__ import annotations

import pytest

from requiretls.policy import Envelope, LocalPolicy, MessageClass, MessageFacts, OptoutFrom, Session, decide
from requiretls.policy.headers import TlsRequiredState, parse_tls_required

VALID_NO = ["No", "no", "NO", "nO", " No", "\tNo", "  \t No", "\r\n No", "\n\tNo", "  \n  No", " \r\n \r\n no"]
INVALID = [
    "Yes",
    "No ",  # nothing may follow "No" (RFC 8689 §3 ABNF ends with CRLF)
    "No\t",
    "No (comment)",  # FWS only, not CFWS
    "No;",
    "Nope",
    "N o",
    "",
    "No\r\n",
    "\r\nNo",  # a fold must be followed by white space
    "\"No\"",
    "=?utf-8?q?No?=",
    "No, thanks",
]


@pytest.mark.parametrize("value", VALID_NO)
def test_rfc8689_s3_valid_tls_required_no_forms_are_recognised(value: str) -> None:
    """RFC 8689 §3: "TLS-Required:" [FWS] "No" CRLF; ABNF literals are case-insensitive (RFC 5234 §2.3)."""
    assert parse_tls_required([("TLS-Required", value)]).state is TlsRequiredState.NO


@pytest.mark.parametrize("value", INVALID)
def test_rfc8689_s3_any_other_value_is_malformed(value: str) -> None:
    """RFC 8689 §3 defines only "No"; anything else is malformed and ignored."""
    assert parse_tls_required([("TLS-Required", value)]).state is TlsRequiredState.MALFORMED


def test_rfc8689_s3_field_name_is_case_insensitive() -> None:
    assert parse_tls_required([("tls-required", "No")]).state is TlsRequiredState.NO
    assert parse_tls_required([("TLS-REQUIRED", "no")]).state is TlsRequiredState.NO


def test_rfc8689_s3_more_than_one_field_is_malformed_even_if_each_says_no() -> None:
    """RFC 8689 §3: "More than one instance of the TLS-Required header field MUST NOT appear"."""
    result = parse_tls_required([("TLS-Required", "No"), ("X-Other", "1"), ("tls-required", "No")])
    assert result.state is TlsRequiredState.DUPLICATE
    assert "more than one" in result.detail


def _facts(headers: list[tuple[str, str]], params: tuple[str, ...] = (), **session: str) -> MessageFacts:
    return MessageFacts(
        Envelope("alice@sender.example", ("bob@dest.example",), params), Session(**session), tuple(headers)
    )


def test_rfc8689_s4_1_tls_required_no_opts_out_under_default_policy() -> None:
    """RFC 8689 §4.1: without the parameter, the header's option is applied."""
    d = decide(_facts([("TLS-Required", "No")]), LocalPolicy())
    assert d.msg_class is MessageClass.OPTOUT
    assert d.recipients[0].msg_class is MessageClass.OPTOUT
    assert not d.header_edits  # the header travels on as it is


def test_rfc8689_s4_1_requiretls_parameter_wins_over_tls_required_no() -> None:
    """RFC 8689 §4.1: with the REQUIRETLS parameter the TLS-Required field "MUST be ignored"."""
    d = decide(_facts([("TLS-Required", "No")], ("REQUIRETLS",)), LocalPolicy())
    assert d.msg_class is MessageClass.REQUIRETLS
    assert any("REQUIRETLS wins" in r for r in d.reasons)
    # the header may be relayed (§4.1 "MAY be included in the onward relay"): it is not deleted
    assert not [e for e in d.header_edits if e.name == "TLS-Required"]


def test_rfc8689_s2_requiretls_parameter_with_a_value_is_a_syntax_error() -> None:
    """RFC 8689 §2: the parameter has no esmtp-value; 501 5.5.4 as for any parameter syntax error."""
    d = decide(_facts([], ("REQUIRETLS=YES",)), LocalPolicy())
    assert d.reject is not None and (d.reject.code, d.reject.dsn) == (501, "5.5.4")


def test_rfc8689_s4_1_parameter_name_is_case_insensitive() -> None:
    d = decide(_facts([], ("SIZE=100", "requiretls")), LocalPolicy())
    assert d.msg_class is MessageClass.REQUIRETLS
    assert d.envelope_params == ("RET=HDRS",)


def test_rfc8689_s5_requiretls_message_gets_ret_hdrs_even_when_client_asked_ret_full() -> None:
    """RFC 8689 §5: "If both RET=FULL and REQUIRETLS are present, the RET=FULL MUST be disregarded"."""
    d = decide(_facts([], ("RET=FULL", "REQUIRETLS")), LocalPolicy())
    assert d.envelope_params == ("RET=HDRS",)


def test_rfc8689_s4_2_1_null_sender_is_exempt_from_requiretls() -> None:
    """RFC 8689 §4.2.1 applies only when the return-path is not empty; §5 bounces go out redacted instead."""
    facts = MessageFacts(Envelope("", ("bob@dest.example",), ("REQUIRETLS",)), Session(), ())
    d = decide(facts, LocalPolicy())
    assert d.msg_class is MessageClass.DEFAULT
    assert any("null sender" in r for r in d.reasons)


def test_require_tls_esmtp_header_upgrades_from_any_sender() -> None:
    """Postfix 3.11's carrier header can only harm the sender's own message, so anyone may use it."""
    d = decide(_facts([("Require-TLS-ESMTP", " yes")], client_ip="192.0.2.1"), LocalPolicy())
    assert d.msg_class is MessageClass.REQUIRETLS


def test_require_tls_esmtp_with_other_value_does_nothing() -> None:
    d = decide(_facts([("Require-TLS-ESMTP", "no")]), LocalPolicy())
    assert d.msg_class is MessageClass.DEFAULT


@pytest.mark.parametrize("value", INVALID)
def test_rfc8689_s3_malformed_header_gives_normal_policy_with_reason(value: str) -> None:
    d = decide(_facts([("TLS-Required", value)]), LocalPolicy())
    assert d.msg_class is MessageClass.DEFAULT
    assert any("malformed TLS-Required" in r for r in d.reasons)


def test_rfc8689_s3_duplicate_header_gives_normal_policy_with_reason() -> None:
    d = decide(_facts([("TLS-Required", "No"), ("TLS-Required", "No")]), LocalPolicy())
    assert d.msg_class is MessageClass.DEFAULT
    assert any("more than one" in r for r in d.reasons)


@pytest.mark.parametrize(
    ("mode", "session", "expected"),
    [
        (OptoutFrom.ANY, {"client_ip": "192.0.2.7"}, MessageClass.OPTOUT),
        (OptoutFrom.TRUSTED, {"client_ip": "192.0.2.7"}, MessageClass.DEFAULT),
        (OptoutFrom.TRUSTED, {"client_ip": "192.0.2.7", "sasl_user": "alice"}, MessageClass.OPTOUT),
        (OptoutFrom.TRUSTED, {"client_ip": "127.0.0.1"}, MessageClass.OPTOUT),
        (OptoutFrom.TRUSTED, {"client_ip": "IPv6:::1"}, MessageClass.OPTOUT),
        (OptoutFrom.TRUSTED, {}, MessageClass.DEFAULT),
        (OptoutFrom.NONE, {"sasl_user": "alice"}, MessageClass.DEFAULT),
    ],
)
def test_who_may_opt_out_with_the_header(mode: OptoutFrom, session: dict[str, str], expected: MessageClass) -> None:
    d = decide(_facts([("TLS-Required", "No")], **session), LocalPolicy(optout_from=mode))
    assert d.msg_class is expected
    if expected is MessageClass.DEFAULT:
        assert any("ignored" in r for r in d.reasons)
