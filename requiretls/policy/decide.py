"""Message facts + local policy -> decision.  The one place where the RFC 8689 tagging rules live."""

from __future__ import annotations

from requiretls.policy.headers import (
    HANDBACK_HEADER,
    ORIGINAL_TLS_REQUIRED,
    PRIVATE_HEADERS,
    ROUTE_HEADER,
    TLS_REQUIRED,
    TlsRequiredState,
    decode_subject,
    encode_subject,
    find_cookie,
    header_values,
    parse_tls_required,
    remove_cookie,
    require_tls_esmtp,
)
from requiretls.policy.local import LocalPolicy, trust
from requiretls.policy.model import (
    Decision,
    DestinationReadiness,
    HeaderEdit,
    MessageClass,
    MessageFacts,
    OptoutFrom,
    PreflightMode,
    Readiness,
    RecipientDecision,
    Rejection,
)
from requiretls.policy.table import TableEntry, split_address

# The private header names live in headers.py; re-exported here for existing callers.
__all__ = ["HANDBACK_HEADER", "PRIVATE_HEADERS", "ROUTE_HEADER", "decide"]


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


def decide(facts: MessageFacts, policy: LocalPolicy) -> Decision:
    """Classify one message and say what to change in it.

    Order of precedence (architecture, "Message classes"): any REQUIRETLS signal wins (RFC 8689 §4.1: the
    MAIL FROM parameter makes ``TLS-Required`` be ignored; a local ``requiretls=yes`` rule beats any opt-out);
    then a permitted opt-out; else the destination's normal policy.
    """
    env, headers = facts.envelope, facts.headers
    reasons: list[str] = []
    edits: list[HeaderEdit] = []
    reject: Rejection | None = None
    null_sender = env.sender.strip("<> ") == ""
    trusted, trust_reason = trust(facts.session, policy)
    sender_rule = policy.senders.lookup_sender(env.sender)

    for name in PRIVATE_HEADERS:
        count = len(header_values(headers, name))
        if count:
            reasons.append(f"removed {count} inbound {name} field(s): private to this MTA")
        # Highest index first, so that each deletion leaves the lower indexes in place.
        edits.extend(HeaderEdit("delete", name, "", i) for i in range(count, 0, -1))

    # Subject cookies are honoured only from trusted clients: anyone else could put them in a Subject.
    subject_values = header_values(headers, "Subject")
    subject_text, _ = decode_subject(subject_values[0]) if subject_values else ("", False)
    rt_cookie = find_cookie(subject_text, policy.requiretls_cookie) >= 0
    oo_cookie = find_cookie(subject_text, policy.optout_cookie) >= 0
    if (rt_cookie or oo_cookie) and not trusted:
        reasons.append(f"subject cookie ignored: {trust_reason}")
        rt_cookie = oo_cookie = False
    used_cookies: list[str] = []

    # --- REQUIRETLS signals -------------------------------------------------------------------------------
    rt_reasons: list[str] = []
    has_param, param_reject = _esmtp_requiretls(env.esmtp_params)
    if param_reject is not None:
        reject = param_reject
        reasons.append("MAIL FROM REQUIRETLS with a value: syntax error (RFC 8689 §2)")
    if null_sender and (has_param or require_tls_esmtp(headers) or rt_cookie):
        reasons.append("REQUIRETLS signal ignored for the null sender (RFC 8689 §4.2.1, §5: bounces are exempt)")
    elif not null_sender:
        if has_param:
            rt_reasons.append("MAIL FROM REQUIRETLS (RFC 8689 §4.1)")
        if require_tls_esmtp(headers):
            rt_reasons.append("Require-TLS-ESMTP: yes header (Postfix 3.11 REQUIRETLS carrier)")
        if rt_cookie:
            rt_reasons.append(f"subject cookie {policy.requiretls_cookie} from trusted client ({trust_reason})")
            used_cookies.append(policy.requiretls_cookie)
    if sender_rule is not None and sender_rule.requiretls:
        rt_reasons.append(f"sender rule {_where(sender_rule)} requiretls=yes")
    dest_rules: dict[str, TableEntry | None] = {}
    dest_rt: dict[str, str] = {}
    for rcpt in env.recipients:
        entry = policy.table.lookup_domain(split_address(rcpt)[1])
        dest_rules[rcpt] = entry
        if entry is not None and entry.requiretls:
            dest_rt[rcpt] = f"destination rule {_where(entry)} requiretls=yes for {rcpt}"
    is_requiretls = bool(rt_reasons or dest_rt)

    # --- opt-out ------------------------------------------------------------------------------------------
    tlsreq = parse_tls_required(headers)
    optout_requested = tlsreq.state is TlsRequiredState.NO
    if tlsreq.state in (TlsRequiredState.MALFORMED, TlsRequiredState.DUPLICATE):
        reasons.append(tlsreq.detail)
    is_optout = False
    optout_reason = ""
    if is_requiretls:
        if optout_requested or oo_cookie:
            reasons.append("opt-out ignored: REQUIRETLS wins over TLS-Required: No (RFC 8689 §4.1)")
    elif optout_requested or oo_cookie:
        via = "TLS-Required: No" if optout_requested else f"subject cookie {policy.optout_cookie}"
        sender_allows = sender_rule is not None and sender_rule.optout is True
        if policy.optout_from is OptoutFrom.NONE:
            reasons.append(f"{via} ignored: opt-out disabled (optout_from = none)")
        elif sender_rule is not None and sender_rule.optout is False:
            reasons.append(f"{via} ignored: sender rule {_where(sender_rule)} optout=no")
        elif oo_cookie and not optout_requested:
            is_optout, optout_reason = True, f"{via} from trusted client ({trust_reason})"
            used_cookies.append(policy.optout_cookie)
        elif policy.optout_from is OptoutFrom.TRUSTED and not trusted and not sender_allows:
            reasons.append(f"{via} ignored: optout_from = trusted and {trust_reason}")
        else:
            if sender_rule is not None and sender_allows and not trusted:
                who = f"sender rule {_where(sender_rule)} optout=yes"
            elif policy.optout_from is OptoutFrom.ANY:
                who = "any sender may opt out"
            else:
                who = trust_reason
            is_optout, optout_reason = True, f"{via} ({who})"
            if oo_cookie:
                used_cookies.append(policy.optout_cookie)

    # --- per recipient --------------------------------------------------------------------------------------
    recipients: list[RecipientDecision] = []
    for rcpt in env.recipients:
        entry = dest_rules[rcpt]
        if is_requiretls:
            if rcpt in dest_rt:
                why = (dest_rt[rcpt], *rt_reasons)
            elif rt_reasons:
                why = tuple(rt_reasons)
            else:
                # Postfix routes a message as a whole, so one recipient's rule makes every copy REQUIRETLS:
                # stricter for the others, never weaker.
                why = (f"message is REQUIRETLS because of another recipient: {next(iter(dest_rt.values()))}",)
            recipients.append(RecipientDecision(rcpt, MessageClass.REQUIRETLS, why))
        elif is_optout and entry is not None and entry.optout is False:
            recipients.append(
                RecipientDecision(
                    rcpt,
                    MessageClass.DEFAULT,
                    (f"opt-out refused by destination rule {_where(entry)} optout=no: normal policy",),
                )
            )
        elif is_optout:
            recipients.append(RecipientDecision(rcpt, MessageClass.OPTOUT, (optout_reason,)))
        else:
            normal = f"destination rule {_where(entry)}" if entry is not None and entry.level else "normal policy"
            recipients.append(RecipientDecision(rcpt, MessageClass.DEFAULT, (normal,)))

    if is_requiretls:
        msg_class = MessageClass.REQUIRETLS
        reasons[:0] = [*rt_reasons, *dest_rt.values()]
    elif is_optout and any(r.msg_class is MessageClass.OPTOUT for r in recipients):
        msg_class = MessageClass.OPTOUT
        reasons.insert(0, optout_reason)
    elif is_optout:
        msg_class = MessageClass.DEFAULT
        reasons.insert(0, f"{optout_reason} refused for every recipient by optout=no rules: normal policy")
    else:
        msg_class = MessageClass.DEFAULT
        reasons.insert(0, "no REQUIRETLS signal and no permitted opt-out: normal policy")

    # --- edits ----------------------------------------------------------------------------------------------
    if used_cookies and subject_values:
        text = subject_text
        for cookie in used_cookies:
            text = remove_cookie(text, cookie)
        edits.append(HeaderEdit("change", "Subject", encode_subject(text), 1))
    originals = header_values(headers, ORIGINAL_TLS_REQUIRED)
    edits.extend(HeaderEdit("delete", ORIGINAL_TLS_REQUIRED, "", i) for i in range(len(originals), 0, -1))
    if msg_class is MessageClass.OPTOUT and not optout_requested:
        # The cookie becomes a real header so that later hops see it; a malformed or duplicated field would
        # make the new one a duplicate, so it goes first.
        n = len(header_values(headers, TLS_REQUIRED))
        edits.extend(HeaderEdit("delete", TLS_REQUIRED, "", i) for i in range(n, 0, -1))
        edits.append(HeaderEdit("add", TLS_REQUIRED, "No"))
    else:
        # Give back what header_checks renamed on Postfix >= 3.10: the field travels on unchanged; added by a
        # milter it is not applied by Postfix itself, so local governance stays in charge of this hop.
        edits.extend(HeaderEdit("add", TLS_REQUIRED, v) for v in originals)
    envelope_params: tuple[str, ...] = ()
    if msg_class is MessageClass.REQUIRETLS:
        # RFC 8689 §5: a bounce of a REQUIRETLS message carries headers only, whatever RET the client gave.
        envelope_params = ("RET=HDRS",)

    if msg_class is MessageClass.REQUIRETLS and reject is None:
        reject = _preflight(facts, policy, reasons)

    native = msg_class is MessageClass.REQUIRETLS and not null_sender and (has_param or require_tls_esmtp(headers))
    return Decision(msg_class, tuple(recipients), tuple(edits), reject, tuple(reasons), envelope_params, native)


def _preflight(facts: MessageFacts, policy: LocalPolicy, reasons: list[str]) -> Rejection | None:
    """Refuse at submission a REQUIRETLS message that no destination check could ever let through."""
    if policy.preflight is PreflightMode.OFF or not facts.readiness:
        return None
    ready: dict[str, DestinationReadiness] = dict(facts.readiness)
    for rcpt in facts.envelope.recipients:
        domain = split_address(rcpt)[1]
        found = ready.get(domain)
        if found is None or found.readiness is not Readiness.IMPOSSIBLE:
            continue
        text = f"REQUIRETLS delivery to {domain} is not possible: {found.reason}"
        code = 550 if found.dsn.startswith("5.") else 450
        if policy.preflight is PreflightMode.WARN:
            reasons.append(f"pre-flight warning: {text}")
            continue
        reasons.append(f"pre-flight: {text}")
        return Rejection(code, found.dsn, text)
    return None
