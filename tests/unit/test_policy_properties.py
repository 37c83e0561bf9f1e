"""Security invariants of the decision core, checked over generated messages, sessions and tables."""

from __future__ import annotations

import email.header

from hypothesis import HealthCheck, given, settings
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
    trust,
)
from requiretls.policy.table import split_address

DOMAINS = ["a.example", "b.example", "mx.a.example", "c.test", "xn--bcher-kva.example"]
KEYS = [*DOMAINS, ".a.example", ".example"]
TLS_VALUES = ["No", "no", " No", "\n No", "Yes", "No ", "no (x)", "", "nope", "\r\n\tNO"]
COOKIES = ["[requiretls]", "[tls-optout]", "[REQUIRETLS]", "[Tls-Optout]"]

settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


@st.composite
def tables(draw: st.DrawFn) -> tuple[PolicyTable, PolicyTable]:
    lines = []
    for key in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=5)):
        level = draw(st.sampled_from(["", "dane", "dane-only", "may", "secure"]))
        attrs = []
        optout = draw(st.sampled_from([None, "yes", "no"]))
        if optout:
            attrs.append(f"optout={optout}")
        if draw(st.booleans()):
            attrs.append("requiretls=yes")
        if not level and not attrs:
            level = "dane"
        lines.append(f"{key} {level} {' '.join(attrs)}")
    senders = []
    for key in draw(st.lists(st.sampled_from(["alice@a.example", "@b.example", "a.example", "<>", "bob@"]),
                             unique=True, max_size=3)):
        attr = draw(st.sampled_from(["optout=no", "optout=yes", "requiretls=yes"]))
        senders.append(f"{key} {attr}")
    return (
        PolicyTable.parse("\n".join(lines), "policy", "destination"),
        PolicyTable.parse("\n".join(senders), "senders", "sender"),
    )


def _encode(text: str, how: str) -> str:
    if how == "plain":
        return text
    return email.header.Header(text, "utf-8").encode() if how == "b" else email.header.Header(
        text, "iso-8859-1"
    ).encode()


@st.composite
def subjects(draw: st.DrawFn, cookies: list[str] = COOKIES) -> str:
    words = draw(st.lists(st.sampled_from(["hello", "Grüße", "re:", *cookies]), max_size=4))
    return _encode(" ".join(words), draw(st.sampled_from(["plain", "b", "q"])))


@st.composite
def message_facts(draw: st.DrawFn, cookies: list[str] = COOKIES) -> MessageFacts:
    headers: list[tuple[str, str]] = [("From", "x@y"), ("Subject", draw(subjects(cookies)))]
    for _ in range(draw(st.integers(0, 2))):
        headers.append((draw(st.sampled_from(["TLS-Required", "tls-required"])), draw(st.sampled_from(TLS_VALUES))))
    if draw(st.booleans()):
        headers.append(("Require-TLS-ESMTP", draw(st.sampled_from(["yes", "no", " YES"]))))
    headers = draw(st.permutations(headers))
    params = tuple(draw(st.lists(st.sampled_from(["SIZE=10", "REQUIRETLS", "RET=FULL", "BODY=8BITMIME"]),
                                 unique=True)))
    sender = draw(st.sampled_from(["", "alice@a.example", "carol@b.example", "bob@c.test"]))
    rcpts = tuple(f"u{i}@{d}" for i, d in enumerate(draw(st.lists(st.sampled_from(DOMAINS), min_size=1,
                                                                       max_size=3))))
    session = Session(
        sasl_user=draw(st.sampled_from([None, "", "alice"])),
        client_ip=draw(st.sampled_from([None, "127.0.0.1", "192.0.2.1", "::1", "IPv6:2001:db8::1", "unknown"])),
    )
    return MessageFacts(Envelope(sender, rcpts, params), session, tuple(headers))


@st.composite
def policies(draw: st.DrawFn) -> LocalPolicy:
    table, senders = draw(tables())
    return LocalPolicy(table=table, senders=senders, optout_from=draw(st.sampled_from(list(OptoutFrom))))


def _has_param(facts: MessageFacts) -> bool:
    return any(p.upper() == "REQUIRETLS" for p in facts.envelope.esmtp_params)


@given(message_facts(), policies())
def test_requiretls_parameter_or_rule_is_never_classed_below_requiretls(
    facts: MessageFacts, policy: LocalPolicy
) -> None:
    d = decide(facts, policy)
    env = facts.envelope
    rule = any(
        (e := policy.table.lookup_domain(split_address(r)[1])) is not None and e.requiretls for r in env.recipients
    )
    srule = policy.senders.lookup_sender(env.sender)
    # RFC 8689 §5: non-delivery reports (the null sender) are exempt from every signal and rule (next test).
    null = env.sender.strip("<> ") == ""
    if not null and (rule or (srule is not None and srule.requiretls) or _has_param(facts)):
        assert d.msg_class is MessageClass.REQUIRETLS
        assert all(r.msg_class is MessageClass.REQUIRETLS for r in d.recipients)
        assert "RET=HDRS" in d.envelope_params


@given(message_facts(), policies())
def test_a_non_delivery_report_is_never_requiretls(facts: MessageFacts, policy: LocalPolicy) -> None:
    """RFC 8689 §5: whatever the rules, a bounce is never REQUIRETLS (it would bounce into a double bounce)."""
    if facts.envelope.sender.strip("<> ") == "":
        d = decide(facts, policy)
        assert d.msg_class is not MessageClass.REQUIRETLS
        assert all(r.msg_class is not MessageClass.REQUIRETLS for r in d.recipients)


@given(message_facts(), policies())
def test_recipient_whose_destination_says_optout_no_is_never_optout(facts: MessageFacts, policy: LocalPolicy) -> None:
    d = decide(facts, policy)
    for r in d.recipients:
        entry = policy.table.lookup_domain(split_address(r.recipient)[1])
        if entry is not None and entry.optout is False:
            assert r.msg_class is not MessageClass.OPTOUT


@given(message_facts(), policies())
def test_untrusted_subject_cookie_never_changes_the_class(facts: MessageFacts, policy: LocalPolicy) -> None:
    if trust(facts.session, policy)[0]:
        return
    without = tuple((n, "plain subject") if n == "Subject" else (n, v) for n, v in facts.headers)
    plain = MessageFacts(facts.envelope, facts.session, without)
    d1, d2 = decide(facts, policy), decide(plain, policy)
    assert d1.msg_class is d2.msg_class
    assert [r.msg_class for r in d1.recipients] == [r.msg_class for r in d2.recipients]
    assert not [e for e in d1.header_edits if e.name == "Subject"]


@given(message_facts(), policies())
def test_untrusted_header_never_opts_out_with_trusted_or_none(facts: MessageFacts, policy: LocalPolicy) -> None:
    if policy.optout_from is OptoutFrom.ANY or trust(facts.session, policy)[0]:
        return
    srule = policy.senders.lookup_sender(facts.envelope.sender)
    if srule is not None and srule.optout is True and policy.optout_from is OptoutFrom.TRUSTED:
        return  # the admin allowed this sender explicitly
    d = decide(facts, policy)
    assert d.msg_class is not MessageClass.OPTOUT
    assert all(r.msg_class is not MessageClass.OPTOUT for r in d.recipients)


@given(message_facts(cookies=["[requiretls]"]), policies())
def test_malformed_or_duplicated_tls_required_never_opts_out(facts: MessageFacts, policy: LocalPolicy) -> None:
    from requiretls.policy.headers import TlsRequiredState, parse_tls_required

    if parse_tls_required(facts.headers).state is TlsRequiredState.NO:
        return
    d = decide(facts, policy)
    assert d.msg_class is not MessageClass.OPTOUT
    assert all(r.msg_class is not MessageClass.OPTOUT for r in d.recipients)


@given(message_facts(), policies())
def test_decision_is_total_and_consistent(facts: MessageFacts, policy: LocalPolicy) -> None:
    d = decide(facts, policy)
    assert [r.recipient for r in d.recipients] == list(facts.envelope.recipients)
    assert d.reasons and all(r.reasons for r in d.recipients)
    assert not [e for e in d.header_edits if e.name == "X-RequireTLS-Route" and e.action != "delete"]
    if d.msg_class is MessageClass.OPTOUT:
        assert any(r.msg_class is MessageClass.OPTOUT for r in d.recipients)
