"""May a REQUIRETLS message go to this destination?  The one verdict (RFC 8689 section 4.2.1).

Destination facts (and, once sessions were tried, what each MX showed) in; deliver, bounce or defer out, with
the enhanced status code and the reason.  ``requiretls check``, the milter's pre-flight, the policy service's
strict zone, the agent's pre-check and its final outcome all call :func:`judge`; none of them decides on its
own.  Pure: no I/O, no clock.

The steps of RFC 8689 section 4.2.1 and where they are judged:

1. the MX lookup succeeded: DNS trouble of any kind defers (RFC 7672 section 2.1.2);
2. the MX name is authenticated, by a DNSSEC-secure MX RRset or by an MTA-STS policy in ``enforce`` mode that
   lists it (RFC 8461 section 4.1).  A ``testing`` policy does not count: its owner has said that failures
   must only be reported (RFC 8461 section 5), and Postfix 3.11's native REQUIRETLS, fed by MTA-STS
   resolvers that answer only for ``enforce``, treats it the same way.  An MTA-STS policy that could not be
   learnt (fetch failure, no cached copy) is doubt: defer, never bounce;
3. the MX is reached over TLS, 4. its certificate verifies (DANE with usable TLSA, else PKIX for the MX name),
5. it advertises REQUIRETLS after STARTTLS.  None of the candidates passing: 5.7.30 when authenticated TLS
   worked but REQUIRETLS was missing, 5.7.10 when no authenticated TLS was possible; a session that broke for
   a reason that may clear up (refused, timeout, lost) defers instead.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from requiretls.facts import Destination, MxHost, MxSource, SessionResult, SessionStage, StsMode, TlsRequirement


class Outcome(enum.StrEnum):
    DELIVER = "deliver"
    BOUNCE = "bounce"
    DEFER = "defer"


#: The SMTP/LMTP reply code of each outcome.
REPLY_CODE = {Outcome.DELIVER: 250, Outcome.BOUNCE: 550, Outcome.DEFER: 451}

#: Enhanced status codes (RFC 8689 section 5, RFC 3463, RFC 7505).
DSN_NO_REQUIRETLS = "5.7.30"
DSN_NO_AUTH_TLS = "5.7.10"
DSN_NULL_MX = "5.1.10"
DSN_NO_DOMAIN = "5.1.2"
DSN_LOOKUP_TROUBLE = "4.4.3"
DSN_NO_MX_NOW = "4.4.1"


@dataclass(frozen=True, slots=True)
class Verdict:
    """``dsn`` is empty for :attr:`Outcome.DELIVER`; ``mx`` names the MX that qualifies (or would be tried
    first); ``probed`` says whether sessions were judged (steps 3-5) or only the DNS and MTA-STS facts."""

    outcome: Outcome
    dsn: str
    reason: str
    mx: str | None = None
    probed: bool = False

    @property
    def code(self) -> int:
        return REPLY_CODE[self.outcome]

    @property
    def deliverable(self) -> bool:
        return self.outcome is Outcome.DELIVER


def mx_validated(dest: Destination, host: MxHost) -> bool:
    """Step 2: the MX name is authenticated by DNSSEC or by an ``enforce`` MTA-STS policy that lists it."""
    if host.mx_secure:
        return True
    policy = dest.sts.policy if dest.sts is not None else None
    return policy is not None and policy.mode is StsMode.ENFORCE and policy.matches(host.name)


def candidates(dest: Destination) -> tuple[MxHost, ...]:
    """The hosts a REQUIRETLS message may be offered to, in preference order."""
    if dest.requirement in (TlsRequirement.DEFER, TlsRequirement.NO_MAIL):
        return ()
    return tuple(h for h in dest.hosts if h.usable and mx_validated(dest, h))


def qualifies(session: SessionResult) -> bool:
    """Steps 3-5 passed on this session: authenticated TLS, then REQUIRETLS in the post-TLS EHLO."""
    return session.stage is SessionStage.DONE and session.tls_ok and session.requiretls and not session.transient


def _how(host: MxHost) -> str:
    return "DNSSEC" if host.mx_secure else "MTA-STS"


def _unvalidated_why(dest: Destination) -> str:
    why = "no MX host is DNSSEC-validated or listed by an MTA-STS policy in enforce mode"
    policy = dest.sts.policy if dest.sts is not None else None
    if policy is not None and policy.mode is not StsMode.ENFORCE:
        why += f" (MTA-STS mode is {policy.mode.value})"
    elif policy is not None:
        why += " (MTA-STS patterns match no usable MX)"
    return why


def judge(dest: Destination, sessions: Sequence[SessionResult] | None = None) -> Verdict:
    """The verdict for ``dest``; ``sessions`` are the sessions tried so far (None: judge steps 1-2 only)."""
    if dest.requirement is TlsRequirement.DEFER:
        return Verdict(Outcome.DEFER, DSN_LOOKUP_TROUBLE, dest.reason)
    if dest.source is MxSource.NULL_MX:
        return Verdict(Outcome.BOUNCE, DSN_NULL_MX, f"{dest.domain}: null MX, the domain accepts no mail (RFC 7505)")
    if dest.source is MxSource.NXDOMAIN or dest.requirement is TlsRequirement.NO_MAIL:
        return Verdict(Outcome.BOUNCE, DSN_NO_DOMAIN, f"{dest.domain}: the domain does not exist")
    trouble = [f"{h.name}: {h.problem}" for h in dest.hosts if not h.usable and h.dns_trouble]
    cands = candidates(dest)
    if not cands:
        if trouble:
            return Verdict(Outcome.DEFER, DSN_LOOKUP_TROUBLE, "DNS trouble for the MX: " + "; ".join(trouble))
        if not dest.mx_secure and dest.sts_unknown:
            detail = dest.sts_error or (dest.sts.detail if dest.sts is not None else "")
            return Verdict(Outcome.DEFER, DSN_LOOKUP_TROUBLE,
                           f"MX not DNSSEC-signed and its MTA-STS policy could not be learnt now: {detail}")
        return Verdict(Outcome.BOUNCE, DSN_NO_AUTH_TLS, f"{dest.domain}: {_unvalidated_why(dest)}")
    if sessions is None:
        first = cands[0]
        return Verdict(Outcome.DELIVER, "",
                       f"{first.name} is {_how(first)}-validated ({first.auth_method.upper()} authentication); "
                       "certificate and REQUIRETLS support not probed", first.name)
    transient = list(trouble)
    no_requiretls: list[str] = []
    no_auth: list[str] = [f"{h.name}: MX neither DNSSEC-signed nor listed by an enforce MTA-STS policy"
                          for h in dest.hosts if h.usable and h not in cands]
    for host in cands:
        tried = [s for s in sessions if s.host == host.name]
        if not tried:
            transient.append(f"{host.name}: not tried")
        for s in tried:
            if qualifies(s):
                return Verdict(Outcome.DELIVER, "",
                               f"{host.name} is {_how(host)}-validated, {s.verification}-verified {s.tls_version} "
                               f"at {s.where}, advertises REQUIRETLS", host.name, True)
            if s.transient:
                transient.append(f"{s.where}: {s.error}")
            elif s.tls_ok and s.stage is SessionStage.DONE:
                no_requiretls.append(f"{s.where}: REQUIRETLS not offered after STARTTLS")
            else:
                no_auth.append(f"{s.where}: {s.verify_error or s.error or s.stage.value}")
    if transient:
        return Verdict(Outcome.DEFER, DSN_NO_MX_NOW, "no MX usable now: " + "; ".join(transient), probed=True)
    if no_requiretls:
        return Verdict(Outcome.BOUNCE, DSN_NO_REQUIRETLS,
                       "REQUIRETLS support required: no validated MX advertises REQUIRETLS after STARTTLS ("
                       + "; ".join(no_requiretls + no_auth) + ")", probed=True)
    return Verdict(Outcome.BOUNCE, DSN_NO_AUTH_TLS,
                   "Encryption needed: no validated MX offers authenticated TLS (" + "; ".join(no_auth) + ")",
                   probed=True)
