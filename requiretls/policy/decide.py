"""Message facts + local policy -> decision.  The one place where the RFC 8689 tagging rules live.

The decision is a chain of small pure steps, each with its own typed result and the reasons it found:

1. :func:`read_signals`: what the envelope, the header and the client claim, after the trust check;
2. :func:`requiretls_tag`: whether any REQUIRETLS signal or local rule tags the message (RFC 8689 §4.1);
3. :func:`optout_grant`: whether local governance lets ``TLS-Required: No`` (or the cookie) apply (§4.2.2);
4. :func:`recipient_classes` and :func:`message_class`: the class per recipient and for the whole message;
5. :func:`private_header_removal` and :func:`header_edits`: what to change in the header;
6. :func:`preflight_rejection`: refuse what no destination could ever accept (adapter-supplied readiness).

:func:`decide_classes` runs steps 1-5, :func:`decide` adds step 6 from ``MessageFacts.readiness``;
:func:`requiretls.policy.classify.classify` adds the MTA, the routes and the readiness callback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from requiretls.policy.headers import (
    HANDBACK_HEADER,
    ORIGINAL_TLS_REQUIRED,
    PRIVATE_HEADERS,
    ROUTE_HEADER,
    TLS_REQUIRED,
    TlsRequired,
    TlsRequiredState,
    decision_fields,
    decode_subject,
    encode_subject,
    find_cookie,
    header_values,
    parse_tls_required,
    remove_cookie,
    require_tls_esmtp,
    writable,
)
from requiretls.policy.local import LocalPolicy, trust
from requiretls.policy.model import (
    Decision,
    DestinationReadiness,
    Envelope,
    HeaderEdit,
    MessageClass,
    MessageFacts,
    OptoutFrom,
    PreflightMode,
    Readiness,
    RecipientDecision,
    Rejection,
    Session,
)
from requiretls.policy.table import TableEntry, split_address

# The names live in headers.py; these stay importable from here for existing callers.
__all__ = [
    "HANDBACK_HEADER",
    "PRIVATE_HEADERS",
    "ROUTE_HEADER",
    "OptoutGrant",
    "RequireTlsTag",
    "Signals",
    "decide",
    "decide_classes",
    "destination_rules",
    "header_edits",
    "message_class",
    "optout_grant",
    "preflight_rejection",
    "private_header_removal",
    "read_signals",
    "recipient_classes",
    "requiretls_tag",
]


def _where(entry: TableEntry) -> str:
    return f"{entry.filename}:{entry.line} {entry.key}"


def _esmtp_requiretls(params: tuple[str, ...]) -> tuple[bool, Rejection | None]:
    """RFC 8689 §2: ``REQUIRETLS`` is a MAIL FROM parameter without a value."""
    for p in params:
        name, eq, _ = p.partition("=")
        if name.upper() == "REQUIRETLS":
            if eq:
                return True, Rejection(501, "5.5.4", "REQUIRETLS parameter takes no value")
            return True, None
    return False, None


#: (sasl_user, client_ip, id(trusted_networks)) -> (trusted_networks, trust()).  The networks object is kept in
#: the value, so its id cannot be reused while the entry lives; a reloaded policy has a new object and misses.
_TRUST_CACHE: dict[tuple[str | None, str | None, int], tuple[object, tuple[bool, str]]] = {}


def _trust(session: Session, policy: LocalPolicy) -> tuple[bool, str]:
    """:func:`requiretls.policy.local.trust`, remembered: a milter sees the same few clients again and again,
    and the walk over ``trusted_networks`` with its reason text costs more than the rest of an opt-out."""
    nets = policy.trusted_networks
    key = (session.sasl_user, session.client_ip, id(nets))
    hit = _TRUST_CACHE.get(key)
    if hit is not None and hit[0] is nets:
        return hit[1]
    found = trust(session, policy)
    if len(_TRUST_CACHE) >= 4096:
        _TRUST_CACHE.clear()
    _TRUST_CACHE[key] = (nets, found)
    return found


# --- step 1: signals ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signals:
    """What the message claims, read once (RFC 8689 §2 parameter, §3 header field; cookies by trust only).

    The cookies are already filtered by trust: an untrusted client's cookie reads as absent (and is noted).
    ``trusted`` is None when nothing asked for it (no cookie, no ``TLS-Required: No``): most messages then skip
    the trusted_networks walk.
    ``subject_text`` is the decoded first Subject, None when the message has none.
    """

    null_sender: bool
    trusted: bool | None
    trust_reason: str
    esmtp_param: bool
    syntax_reject: Rejection | None
    carrier: bool
    requiretls_cookie: bool
    optout_cookie: bool
    tls_required: TlsRequired
    subject_text: str | None
    notes: tuple[str, ...] = ()


def read_signals(
    facts: MessageFacts, policy: LocalPolicy, headers: Sequence[tuple[str, str]] | None = None
) -> Signals:
    """Step 1: read the MAIL FROM parameter (RFC 8689 §2), ``TLS-Required`` (§3), the Require-TLS-ESMTP carrier
    and the subject cookies.  Subject cookies are honoured only from trusted clients: anyone else could put
    them in a Subject.  ``headers``: ``facts.headers`` already narrowed by :func:`decision_fields`, if done."""
    env = facts.envelope
    if headers is None:
        headers = facts.headers
    notes: list[str] = []
    subject_values = header_values(headers, "Subject")
    subject_text = decode_subject(subject_values[0])[0] if subject_values else None
    text = subject_text or ""
    rt_cookie = find_cookie(text, policy.requiretls_cookie) >= 0
    oo_cookie = find_cookie(text, policy.optout_cookie) >= 0
    tls_required = parse_tls_required(headers)
    trusted: bool | None = None
    trust_reason = ""
    if rt_cookie or oo_cookie or tls_required.state is TlsRequiredState.NO:
        trusted, trust_reason = _trust(facts.session, policy)
    if (rt_cookie or oo_cookie) and not trusted:
        notes.append(f"subject cookie ignored: {trust_reason}")
        rt_cookie = oo_cookie = False
    has_param, param_reject = _esmtp_requiretls(env.esmtp_params)
    if param_reject is not None:
        notes.append("MAIL FROM REQUIRETLS with a value: syntax error (RFC 8689 §2)")
    # Positional: a keyword call of eleven fields costs measurably more per message.
    return Signals(env.sender.strip("<> ") == "", trusted, trust_reason, has_param, param_reject,
                   require_tls_esmtp(headers), rt_cookie, oo_cookie, tls_required, subject_text, tuple(notes))


def destination_rules(env: Envelope, policy: LocalPolicy) -> tuple[TableEntry | None, ...]:
    """The destination table entry of each recipient, in envelope order (looked up once per message)."""
    return tuple(policy.table.lookup_domain(split_address(rcpt)[1]) for rcpt in env.recipients)


# --- step 2: REQUIRETLS tag -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequireTlsTag:
    """Why the message is REQUIRETLS, if it is.  ``message`` reasons hold for every recipient;
    ``destinations`` are ``(recipient, reason)`` for ``requiretls=yes`` destination rules.  ``native``: the tag
    came in a form Postfix 3.11 carries and enforces itself (parameter or carrier header)."""

    message: tuple[str, ...]
    destinations: tuple[tuple[str, str], ...]
    native: bool
    cookie_used: bool
    notes: tuple[str, ...] = ()

    @property
    def tagged(self) -> bool:
        return bool(self.message or self.destinations)


#: The common case, shared: no signal, no rule, nothing to note.
_UNTAGGED = RequireTlsTag((), (), False, False)


def requiretls_tag(
    env: Envelope,
    policy: LocalPolicy,
    signals: Signals,
    sender_rule: TableEntry | None,
    rules: Sequence[TableEntry | None],
) -> RequireTlsTag:
    """Step 2: any REQUIRETLS signal tags the message (RFC 8689 §4.1).  A non-delivery report (the null
    sender) is exempt from every signal and every rule, a destination or ``<>`` sender rule included (§5: it
    is sent headers-only instead, and must not bounce for lack of TLS into a double bounce)."""
    reasons: list[str] = []
    notes: list[str] = []
    if signals.null_sender:
        own = signals.esmtp_param or signals.carrier or signals.requiretls_cookie
        ruled = (sender_rule is not None and sender_rule.requiretls) or any(
            e is not None and e.requiretls for e in rules)
        if not (own or ruled):
            return _UNTAGGED
        what = "REQUIRETLS signal" if own else "requiretls=yes rule"
        notes.append(f"{what} ignored for the null sender: non-delivery reports are exempt (RFC 8689 §5)")
        return RequireTlsTag((), (), False, False, tuple(notes))
    if signals.esmtp_param:
        reasons.append("MAIL FROM REQUIRETLS (RFC 8689 §4.1)")
    if signals.carrier:
        reasons.append("Require-TLS-ESMTP: yes header (Postfix 3.11 REQUIRETLS carrier)")
    if signals.requiretls_cookie:
        reasons.append(f"subject cookie {policy.requiretls_cookie} from trusted client ({signals.trust_reason})")
    if sender_rule is not None and sender_rule.requiretls:
        reasons.append(f"sender rule {_where(sender_rule)} requiretls=yes")
    dests: list[tuple[str, str]] = []
    for rcpt, entry in zip(env.recipients, rules, strict=True):
        if entry is not None and entry.requiretls:
            dests.append((rcpt, f"destination rule {_where(entry)} requiretls=yes for {rcpt}"))
    if not (reasons or dests):
        return _UNTAGGED
    return RequireTlsTag(tuple(reasons), tuple(dests), signals.esmtp_param or signals.carrier,
                         signals.requiretls_cookie, ())


# --- step 3: opt-out governance -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptoutGrant:
    """The outcome of local governance over an opt-out request (RFC 8689 §4.2.2 leaves it to the MTA).

    ``requested``: a single well-formed ``TLS-Required: No`` field is present; ``granted``: the message is
    opted out (per-destination ``optout=no`` is applied later, per recipient); ``cookie_used``: the opt-out
    cookie is consumed and is to be removed from the Subject."""

    requested: bool
    granted: bool
    reason: str
    cookie_used: bool
    notes: tuple[str, ...] = ()


#: The common case, shared: no opt-out was asked for.
_NOT_ASKED = OptoutGrant(False, False, "", False)


def optout_grant(policy: LocalPolicy, signals: Signals, sender_rule: TableEntry | None, tagged: bool) -> OptoutGrant:
    """Step 3: REQUIRETLS wins over ``TLS-Required: No`` (RFC 8689 §4.1); malformed or duplicated fields are
    ignored (§3); otherwise ``optout_from`` and the sender table decide who may opt out."""
    tlsreq = signals.tls_required
    requested = tlsreq.state is TlsRequiredState.NO
    cookie = signals.optout_cookie
    notes: list[str] = []
    if tlsreq.state in (TlsRequiredState.MALFORMED, TlsRequiredState.DUPLICATE):
        notes.append(tlsreq.detail)
    if not (requested or cookie):
        return OptoutGrant(False, False, "", False, tuple(notes)) if notes else _NOT_ASKED
    if tagged:
        notes.append("opt-out ignored: REQUIRETLS wins over TLS-Required: No (RFC 8689 §4.1)")
        return OptoutGrant(requested, False, "", False, tuple(notes))
    via = "TLS-Required: No" if requested else f"subject cookie {policy.optout_cookie}"
    sender_allows = sender_rule is not None and sender_rule.optout is True
    if policy.optout_from is OptoutFrom.NONE:
        notes.append(f"{via} ignored: opt-out disabled (optout_from = none)")
    elif sender_rule is not None and sender_rule.optout is False:
        notes.append(f"{via} ignored: sender rule {_where(sender_rule)} optout=no")
    elif cookie and not requested:
        # The cookie is already filtered by trust (read_signals).
        return OptoutGrant(False, True, f"{via} from trusted client ({signals.trust_reason})", True, tuple(notes))
    elif policy.optout_from is OptoutFrom.TRUSTED and not signals.trusted and not sender_allows:
        notes.append(f"{via} ignored: optout_from = trusted and {signals.trust_reason}")
    else:
        if sender_rule is not None and sender_allows and not signals.trusted:
            who = f"sender rule {_where(sender_rule)} optout=yes"
        elif policy.optout_from is OptoutFrom.ANY:
            who = "any sender may opt out"
        else:
            who = signals.trust_reason
        return OptoutGrant(requested, True, f"{via} ({who})", cookie, tuple(notes))
    return OptoutGrant(requested, False, "", False, tuple(notes))


# --- step 4: classes ------------------------------------------------------------------------------------------


def recipient_classes(
    env: Envelope, rules: Sequence[TableEntry | None], tag: RequireTlsTag, grant: OptoutGrant
) -> tuple[RecipientDecision, ...]:
    """Step 4a: the effective class of each recipient, with its reasons.  A ``requiretls=yes`` destination
    makes every copy REQUIRETLS (Postfix routes a message as a whole: stricter for the others, never weaker);
    ``optout=no`` keeps a destination on its normal policy whatever the sender asked."""
    dest_rt = dict(tag.destinations) if tag.destinations else {}
    out: list[RecipientDecision] = []
    for rcpt, entry in zip(env.recipients, rules, strict=True):
        why: tuple[str, ...]
        if tag.tagged:
            if rcpt in dest_rt:
                why = (dest_rt[rcpt], *tag.message)
            elif tag.message:
                why = tag.message
            else:
                why = (f"message is REQUIRETLS because of another recipient: {tag.destinations[0][1]}",)
            out.append(RecipientDecision(rcpt, MessageClass.REQUIRETLS, why))
        elif grant.granted and entry is not None and entry.optout is False:
            why = (f"opt-out refused by destination rule {_where(entry)} optout=no: normal policy",)
            out.append(RecipientDecision(rcpt, MessageClass.DEFAULT, why))
        elif grant.granted:
            out.append(RecipientDecision(rcpt, MessageClass.OPTOUT, (grant.reason,)))
        else:
            normal = f"destination rule {_where(entry)}" if entry is not None and entry.level else "normal policy"
            out.append(RecipientDecision(rcpt, MessageClass.DEFAULT, (normal,)))
    return tuple(out)


def message_class(
    recipients: Sequence[RecipientDecision], tag: RequireTlsTag, grant: OptoutGrant
) -> tuple[MessageClass, tuple[str, ...]]:
    """Step 4b: the class the whole message is routed by (architecture, "Message classes"), with the leading
    reasons: REQUIRETLS wins (RFC 8689 §4.1); opt-out if at least one recipient keeps it; else default."""
    if tag.tagged:
        return MessageClass.REQUIRETLS, (*tag.message, *(why for _, why in tag.destinations))
    if grant.granted and any(r.msg_class is MessageClass.OPTOUT for r in recipients):
        return MessageClass.OPTOUT, (grant.reason,)
    if grant.granted:
        return MessageClass.DEFAULT, (f"{grant.reason} refused for every recipient by optout=no rules: normal policy",)
    return MessageClass.DEFAULT, ("no REQUIRETLS signal and no permitted opt-out: normal policy",)


# --- step 5: edits ----------------------------------------------------------------------------------------------


def private_header_removal(headers: Sequence[tuple[str, str]]) -> tuple[tuple[HeaderEdit, ...], tuple[str, ...]]:
    """Step 5a: delete inbound copies of our private fields (forgeries: only this MTA may add them)."""
    edits: list[HeaderEdit] = []
    notes: list[str] = []
    for name in PRIVATE_HEADERS:
        count = len(header_values(headers, name))
        if count:
            notes.append(f"removed {count} inbound {name} field(s): private to this MTA")
            # Highest index first, so that each deletion leaves the lower indexes in place.
            edits.extend(HeaderEdit("delete", name, "", i) for i in range(count, 0, -1))
    if not edits:
        return (), ()
    return tuple(edits), tuple(notes)


def header_edits(
    headers: Sequence[tuple[str, str]],
    policy: LocalPolicy,
    signals: Signals,
    tag: RequireTlsTag,
    grant: OptoutGrant,
    msg_class: MessageClass,
) -> tuple[HeaderEdit, ...]:
    """Step 5b: remove used cookies from the Subject (RFC 2047 re-encoded), restore or write ``TLS-Required``
    (RFC 8689 §3) so that later hops see the opt-out."""
    edits: list[HeaderEdit] = []
    if (tag.cookie_used or grant.cookie_used) and signals.subject_text is not None:
        text = signals.subject_text
        if tag.cookie_used:
            text = remove_cookie(text, policy.requiretls_cookie)
        if grant.cookie_used:
            text = remove_cookie(text, policy.optout_cookie)
        edits.append(HeaderEdit("change", "Subject", encode_subject(text), 1))
    originals = header_values(headers, ORIGINAL_TLS_REQUIRED) if headers else []
    cookie_optout = msg_class is MessageClass.OPTOUT and not grant.requested
    for i in range(len(originals), 0, -1):
        # A value with bytes that are not UTF-8 cannot be written back (see headers.writable): that field stays
        # under its renamed name, unchanged.  It is malformed anyway (only "No" is defined, RFC 8689 §3), and
        # its name keeps Postfix from reading it.
        if cookie_optout or writable(originals[i - 1]):
            edits.append(HeaderEdit("delete", ORIGINAL_TLS_REQUIRED, "", i))
    if cookie_optout:
        # The cookie becomes a real header so that later hops see it; a malformed or duplicated field would
        # make the new one a duplicate, so it goes first.
        for i in range(len(header_values(headers, TLS_REQUIRED)), 0, -1):
            edits.append(HeaderEdit("delete", TLS_REQUIRED, "", i))
        edits.append(HeaderEdit("add", TLS_REQUIRED, "No"))
    else:
        # Give back what header_checks renamed on Postfix >= 3.10: the field travels on unchanged; added by a
        # milter it is not applied by Postfix itself, so local governance stays in charge of this hop.
        for v in originals:
            if writable(v):
                edits.append(HeaderEdit("add", TLS_REQUIRED, v))
    return tuple(edits)


# --- step 6: pre-flight -----------------------------------------------------------------------------------------


def preflight_rejection(
    recipients: Sequence[str], policy: LocalPolicy, readiness: Mapping[str, DestinationReadiness]
) -> tuple[Rejection | None, tuple[str, ...]]:
    """Step 6: refuse at submission a REQUIRETLS message that no destination check could ever let through
    (RFC 8689 §5 would bounce it later with 5.7.30 or 5.7.10).  ``readiness`` maps a recipient domain to what
    the adapter found; only ``impossible`` counts, ``unknown`` never refuses."""
    if policy.preflight is PreflightMode.OFF or not readiness:
        return None, ()
    notes: list[str] = []
    for rcpt in recipients:
        domain = split_address(rcpt)[1]
        found = readiness.get(domain)
        if found is None or found.readiness is not Readiness.IMPOSSIBLE:
            continue
        text = f"REQUIRETLS delivery to {domain} is not possible: {found.reason}"
        if policy.preflight is PreflightMode.WARN:
            notes.append(f"pre-flight warning: {text}")
            continue
        notes.append(f"pre-flight: {text}")
        return Rejection(550 if found.dsn.startswith("5.") else 450, found.dsn, text), tuple(notes)
    return None, tuple(notes)


# --- composition ------------------------------------------------------------------------------------------------


def decide_classes(facts: MessageFacts, policy: LocalPolicy) -> Decision:
    """Steps 1-5: classify one message and say what to change in it, without pre-flight.

    Order of precedence (architecture, "Message classes"): any REQUIRETLS signal wins (RFC 8689 §4.1: the
    MAIL FROM parameter makes ``TLS-Required`` be ignored; a local ``requiretls=yes`` rule beats any opt-out);
    then a permitted opt-out; else the destination's normal policy.
    """
    env = facts.envelope
    headers = decision_fields(facts.headers)
    signals = read_signals(facts, policy, headers)
    sender_rule = policy.senders.lookup_sender(env.sender)
    rules = destination_rules(env, policy)
    tag = requiretls_tag(env, policy, signals, sender_rule, rules)
    grant = optout_grant(policy, signals, sender_rule, tag.tagged)
    recipients = recipient_classes(env, rules, tag, grant)
    msg_class, lead = message_class(recipients, tag, grant)
    removal, removal_notes = private_header_removal(headers)
    edits = removal + header_edits(headers, policy, signals, tag, grant, msg_class)
    reasons = (*lead, *removal_notes, *signals.notes, *tag.notes, *grant.notes)
    # RFC 8689 §5: a bounce of a REQUIRETLS message carries headers only, whatever RET the client gave.
    params = ("RET=HDRS",) if msg_class is MessageClass.REQUIRETLS else ()
    return Decision(msg_class, recipients, edits, signals.syntax_reject, reasons, params, tag.native)


def decide(facts: MessageFacts, policy: LocalPolicy) -> Decision:
    """Steps 1-6: :func:`decide_classes`, then pre-flight from ``facts.readiness`` for every recipient.

    Adapters that know the recipients' routes use :func:`requiretls.policy.classify.classify` instead, which
    asks for readiness only where the message leaves through the REQUIRETLS path.
    """
    d = decide_classes(facts, policy)
    if d.msg_class is not MessageClass.REQUIRETLS or d.reject is not None or not facts.readiness:
        return d
    reject, notes = preflight_rejection(facts.envelope.recipients, policy, dict(facts.readiness))
    if reject is None and not notes:
        return d
    return Decision(d.msg_class, d.recipients, d.header_edits, reject, (*d.reasons, *notes), d.envelope_params,
                    d.native_requiretls)
