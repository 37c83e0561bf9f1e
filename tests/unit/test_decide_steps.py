"""Each step of the decision on its own (requiretls.policy.decide), with the reasons it gives."""

from __future__ import annotations

from requiretls.policy import (
    DestinationReadiness,
    Envelope,
    LocalPolicy,
    MessageClass,
    MessageFacts,
    OptoutFrom,
    PolicyTable,
    PreflightMode,
    Readiness,
    Session,
)
from requiretls.policy.decide import (
    OptoutGrant,
    RequireTlsTag,
    decide_classes,
    destination_rules,
    header_edits,
    message_class,
    optout_grant,
    preflight_rejection,
    private_header_removal,
    read_signals,
    recipient_classes,
    requiretls_tag,
)
from requiretls.policy.model import HeaderEdit

TRUSTED = Session(sasl_user="alice")
UNTRUSTED = Session(client_ip="192.0.2.9")
TABLE = PolicyTable.parse("rt.example secure requiretls=yes\nno.example dane optout=no\n", "policy")
SENDERS = PolicyTable.parse("boss@s.example requiretls=yes\nmute@s.example optout=no\nok@s.example optout=yes\n",
                            "senders", "sender")
POLICY = LocalPolicy(table=TABLE, senders=SENDERS, optout_from=OptoutFrom.TRUSTED)


def _facts(headers: tuple[tuple[str, str], ...] = (), sender: str = "a@s.example", rcpts: tuple[str, ...] = (
        "b@d.example",), params: tuple[str, ...] = (), session: Session = TRUSTED) -> MessageFacts:
    return MessageFacts(Envelope(sender, rcpts, params), session, headers)


# --- step 1 ---

def test_signals_drop_an_untrusted_clients_cookies_and_say_why() -> None:
    s = read_signals(_facts((("Subject", "[requiretls] [tls-optout] x"),), session=UNTRUSTED), POLICY)
    assert not s.requiretls_cookie and not s.optout_cookie
    assert s.notes == ("subject cookie ignored: client 192.0.2.9 not authenticated and not in trusted_networks",)


def test_signals_read_a_trusted_cookie_in_an_encoded_subject() -> None:
    s = read_signals(_facts((("Subject", "=?utf-8?q?=5Brequiretls=5D_Gr=C3=BC=C3=9Fe?="),)), POLICY)
    assert s.requiretls_cookie and s.subject_text == "[requiretls] Grüße" and s.trusted


def test_signals_requiretls_with_a_value_is_a_501_syntax_error() -> None:
    """RFC 8689 §2: the parameter has no value."""
    s = read_signals(_facts(params=("REQUIRETLS=yes",)), POLICY)
    assert s.esmtp_param and s.syntax_reject is not None and s.syntax_reject.code == 501
    assert "syntax error (RFC 8689 §2)" in s.notes[0]


def test_signals_null_sender_and_carrier() -> None:
    s = read_signals(_facts((("Require-TLS-ESMTP", " YES"),), sender="<>"), POLICY)
    assert s.null_sender and s.carrier and s.subject_text is None


# --- step 2 ---

def _tag(facts: MessageFacts, policy: LocalPolicy = POLICY) -> RequireTlsTag:
    env = facts.envelope
    return requiretls_tag(env, policy, read_signals(facts, policy), policy.senders.lookup_sender(env.sender),
                          destination_rules(env, policy))


def test_tag_parameter_is_native_cookie_is_not() -> None:
    t = _tag(_facts(params=("REQUIRETLS",)))
    assert t.tagged and t.native and t.message == ("MAIL FROM REQUIRETLS (RFC 8689 §4.1)",)
    t = _tag(_facts((("Subject", "[requiretls] x"),)))
    assert t.tagged and not t.native and t.cookie_used


def test_tag_null_sender_is_exempt_from_signals_and_from_local_rules() -> None:
    """RFC 8689 §5: a non-delivery report is returned headers-only, never REQUIRETLS; a destination rule must
    not turn a bounce into a 5.7.30 double bounce (issue "REQUIRETLS on every path")."""
    t = _tag(_facts(params=("REQUIRETLS",), sender=""))
    assert not t.tagged and not t.native and "null sender" in t.notes[0]
    t = _tag(_facts(sender="", rcpts=("u@rt.example",)))
    assert not t.tagged and t.destinations == () and "requiretls=yes rule ignored for the null sender" in t.notes[0]
    t = _tag(_facts(sender="a@s.example", rcpts=("u@rt.example",)))
    assert t.tagged and t.destinations == (("u@rt.example", "destination rule policy:1 rt.example requiretls=yes "
                                                           "for u@rt.example"),)


def test_tag_sender_rule() -> None:
    assert _tag(_facts(sender="boss@s.example")).message == ("sender rule senders:1 boss@s.example requiretls=yes",)


# --- step 3 ---

def _grant(facts: MessageFacts, policy: LocalPolicy = POLICY, tagged: bool = False) -> OptoutGrant:
    return optout_grant(policy, read_signals(facts, policy), policy.senders.lookup_sender(facts.envelope.sender),
                        tagged)


NO = (("TLS-Required", "No"),)


def test_grant_requiretls_wins() -> None:
    g = _grant(_facts(NO), tagged=True)
    assert g.requested and not g.granted
    assert g.notes == ("opt-out ignored: REQUIRETLS wins over TLS-Required: No (RFC 8689 §4.1)",)


def test_grant_governance_order() -> None:
    assert _grant(_facts(NO)).reason == "TLS-Required: No (SASL-authenticated as alice)"
    assert not _grant(_facts(NO, session=UNTRUSTED)).granted
    assert _grant(_facts(NO, sender="ok@s.example", session=UNTRUSTED)).reason == (
        "TLS-Required: No (sender rule senders:3 ok@s.example optout=yes)")
    g = _grant(_facts(NO, sender="mute@s.example"))
    assert not g.granted and g.notes == ("TLS-Required: No ignored: sender rule senders:2 mute@s.example optout=no",)
    g = _grant(_facts(NO), LocalPolicy(optout_from=OptoutFrom.NONE))
    assert not g.granted and "optout_from = none" in g.notes[0]


def test_grant_cookie_alone_is_used_and_malformed_field_is_noted() -> None:
    g = _grant(_facts((("Subject", "[tls-optout] x"),)))
    assert g.granted and g.cookie_used and not g.requested
    g = _grant(_facts((("TLS-Required", "No"), ("TLS-Required", "No"))))
    assert not g.granted and "2 TLS-Required fields" in g.notes[0]


# --- step 4 ---

def test_classes_optout_no_destination_keeps_default_and_requiretls_spreads() -> None:
    f = _facts(NO, rcpts=("b@d.example", "c@no.example"))
    env = f.envelope
    rules = destination_rules(env, POLICY)
    tag, grant = _tag(f), _grant(f)
    rs = recipient_classes(env, rules, tag, grant)
    assert [r.msg_class for r in rs] == [MessageClass.OPTOUT, MessageClass.DEFAULT]
    assert "optout=no" in rs[1].reasons[0]
    assert message_class(rs, tag, grant)[0] is MessageClass.OPTOUT
    only_no = _facts(NO, rcpts=("c@no.example",))
    rs = recipient_classes(only_no.envelope, destination_rules(only_no.envelope, POLICY), tag, grant)
    cls, lead = message_class(rs, tag, grant)
    assert cls is MessageClass.DEFAULT and "refused for every recipient" in lead[0]
    f = _facts(rcpts=("b@d.example", "u@rt.example"))
    tag = _tag(f)
    rs = recipient_classes(f.envelope, destination_rules(f.envelope, POLICY), tag, _grant(f))
    assert all(r.msg_class is MessageClass.REQUIRETLS for r in rs)
    assert rs[0].reasons[0].startswith("message is REQUIRETLS because of another recipient")


# --- step 5 ---

def test_private_header_removal_highest_index_first() -> None:
    edits, notes = private_header_removal((("X-RequireTLS-Route", "a"), ("x-requiretls-route", "b"),
                                           ("X-RequireTLS-Handback", "<c@d>")))
    assert edits == (HeaderEdit("delete", "X-RequireTLS-Route", "", 2),
                     HeaderEdit("delete", "X-RequireTLS-Route", "", 1),
                     HeaderEdit("delete", "X-RequireTLS-Handback", "", 1))
    assert len(notes) == 2


def test_edits_cookie_becomes_a_header_and_original_is_restored() -> None:
    f = _facts((("Subject", "[tls-optout] hi"), ("TLS-Required", "maybe")))
    s, tag, grant = read_signals(f, POLICY), _tag(f), _grant(f)
    assert header_edits(f.headers, POLICY, s, tag, grant, MessageClass.OPTOUT) == (
        HeaderEdit("change", "Subject", "hi", 1), HeaderEdit("delete", "TLS-Required", "", 1),
        HeaderEdit("add", "TLS-Required", "No"))
    f = _facts((("X-Original-TLS-Required", "No"),), session=UNTRUSTED)
    s, tag, grant = read_signals(f, POLICY), _tag(f), _grant(f)
    assert header_edits(f.headers, POLICY, s, tag, grant, MessageClass.DEFAULT) == (
        HeaderEdit("delete", "X-Original-TLS-Required", "", 1), HeaderEdit("add", "TLS-Required", "No"))


# --- step 6 ---

def test_preflight_warn_notes_reject_refuses_unknown_never_does() -> None:
    ready = {"x.example": DestinationReadiness(Readiness.IMPOSSIBLE, "no MX offers REQUIRETLS", "5.7.30"),
             "y.example": DestinationReadiness(Readiness.UNKNOWN, "timed out")}
    rcpts = ("a@y.example", "b@x.example")
    rej, notes = preflight_rejection(rcpts, LocalPolicy(preflight=PreflightMode.REJECT), ready)
    assert rej is not None and (rej.code, rej.dsn) == (550, "5.7.30")
    assert notes == ("pre-flight: REQUIRETLS delivery to x.example is not possible: no MX offers REQUIRETLS",)
    rej, notes = preflight_rejection(rcpts, LocalPolicy(preflight=PreflightMode.WARN), ready)
    assert rej is None and notes[0].startswith("pre-flight warning: ")
    assert preflight_rejection(("a@y.example",), LocalPolicy(preflight=PreflightMode.REJECT), ready) == (None, ())
    assert preflight_rejection(rcpts, LocalPolicy(), ready) == (None, ())


def test_decide_classes_leads_with_the_class_reason_and_keeps_every_note() -> None:
    d = decide_classes(_facts((("X-RequireTLS-Route", "relay"), ("TLS-Required", "No")), params=("REQUIRETLS",)),
                       POLICY)
    assert d.reasons == ("MAIL FROM REQUIRETLS (RFC 8689 §4.1)",
                         "removed 1 inbound X-RequireTLS-Route field(s): private to this MTA",
                         "opt-out ignored: REQUIRETLS wins over TLS-Required: No (RFC 8689 §4.1)")
    assert d.envelope_params == ("RET=HDRS",) and d.native_requiretls


def test_trust_is_not_carried_over_to_a_reloaded_policy() -> None:
    """The trust check is remembered per client, but a reload (new trusted_networks) decides afresh."""
    import ipaddress

    facts = _facts(NO, session=Session(client_ip="192.0.2.9"))
    first = LocalPolicy(optout_from=OptoutFrom.TRUSTED)
    assert read_signals(facts, first).trusted is False
    reloaded = LocalPolicy(optout_from=OptoutFrom.TRUSTED, trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),))
    assert read_signals(facts, reloaded).trusted is True
    assert read_signals(facts, first).trusted is False
    assert read_signals(_facts(NO, session=Session(client_ip="192.0.2.9", sasl_user="bob")), first).trusted is True
