"""Subject cookies: RFC 2047-decoded, honoured only from trusted clients, removed once used."""

from __future__ import annotations

import email.header

from requiretls.policy import Envelope, LocalPolicy, MessageClass, MessageFacts, OptoutFrom, Session, decide
from requiretls.policy.headers import decode_subject, remove_cookie

TRUSTED = Session(sasl_user="alice", client_ip="192.0.2.10")
UNTRUSTED = Session(client_ip="192.0.2.10")


def _facts(subject: str, session: Session, extra: tuple[tuple[str, str], ...] = ()) -> MessageFacts:
    return MessageFacts(
        Envelope("alice@sender.example", ("bob@dest.example",)), session, (("Subject", subject), *extra)
    )


def _subject_edit(d: object) -> str | None:
    for e in d.header_edits:  # type: ignore[attr-defined]
        if e.name == "Subject" and e.action == "change":
            return str(e.value)
    return None


def test_rfc2047_encoded_optout_cookie_from_sasl_user_opts_out_and_is_removed() -> None:
    """RFC 2047 §6: the cookie is matched in the decoded text; the rewritten Subject is re-encoded."""
    raw = email.header.Header("[tls-optout] Grüße aus Köln", "utf-8").encode()
    assert "tls-optout" not in raw  # really encoded
    d = decide(_facts(raw, TRUSTED), LocalPolicy())
    assert d.msg_class is MessageClass.OPTOUT
    new = _subject_edit(d)
    assert new is not None and decode_subject(new)[0] == "Grüße aus Köln"
    assert ("add", "TLS-Required", "No") in [(e.action, e.name, e.value) for e in d.header_edits]


def test_cookie_split_across_encoded_words_and_folding_is_found() -> None:
    raw = "=?utf-8?q?Re=3A_=5Btls-?=\n =?utf-8?q?optout=5D_hello?="
    d = decide(_facts(raw, TRUSTED), LocalPolicy())
    assert d.msg_class is MessageClass.OPTOUT
    assert _subject_edit(d) == "Re: hello"


def test_cookie_from_untrusted_client_changes_nothing_even_with_optout_any() -> None:
    for cookie in ("[tls-optout]", "[requiretls]"):
        d = decide(_facts(f"{cookie} hi", UNTRUSTED), LocalPolicy(optout_from=OptoutFrom.ANY))
        assert d.msg_class is MessageClass.DEFAULT
        assert _subject_edit(d) is None
        assert any("subject cookie ignored" in r for r in d.reasons)


def test_requiretls_cookie_tags_and_is_removed_case_insensitively() -> None:
    d = decide(_facts("Quarterly [RequireTLS] figures", TRUSTED), LocalPolicy())
    assert d.msg_class is MessageClass.REQUIRETLS
    assert _subject_edit(d) == "Quarterly figures"
    assert d.envelope_params == ("RET=HDRS",)


def test_requiretls_cookie_beats_optout_cookie() -> None:
    d = decide(_facts("[tls-optout] [requiretls] x", TRUSTED), LocalPolicy())
    assert d.msg_class is MessageClass.REQUIRETLS
    assert _subject_edit(d) == "[tls-optout] x"


def test_configured_cookies_are_used() -> None:
    policy = LocalPolicy(requiretls_cookie="{secure}", optout_cookie="{plain}")
    assert decide(_facts("{plain} x", TRUSTED), policy).msg_class is MessageClass.OPTOUT
    assert decide(_facts("[tls-optout] x", TRUSTED), policy).msg_class is MessageClass.DEFAULT


def test_optout_cookie_replaces_malformed_tls_required_instead_of_duplicating_it() -> None:
    d = decide(_facts("[tls-optout] x", TRUSTED, (("TLS-Required", "maybe"),)), LocalPolicy())
    assert d.msg_class is MessageClass.OPTOUT
    edits = [(e.action, e.name, e.value) for e in d.header_edits if e.name == "TLS-Required"]
    assert edits == [("delete", "TLS-Required", ""), ("add", "TLS-Required", "No")]


def test_optout_cookie_with_optout_none_changes_nothing() -> None:
    d = decide(_facts("[tls-optout] x", TRUSTED), LocalPolicy(optout_from=OptoutFrom.NONE))
    assert d.msg_class is MessageClass.DEFAULT
    assert _subject_edit(d) is None


def test_undecodable_encoded_word_keeps_raw_text() -> None:
    text, encoded = decode_subject("=?x-unknown-charset?q?abc?= [tls-optout]")
    assert "[tls-optout]" in text and encoded is False


def test_remove_cookie_tidies_spaces() -> None:
    assert remove_cookie("a [c] b", "[c]") == "a b"
    assert remove_cookie("[c] b", "[C]") == "b"
    assert remove_cookie("a [c]", "[c]") == "a"
    assert remove_cookie("a b", "[c]") == "a b"
