"""Outbound delivery of one message to one destination domain (blocking; the agent runs it in a thread).

REQUIRETLS (RFC 8689 section 4.2.1): each candidate MX in preference order (:func:`eligibility.candidates`),
each of its addresses, one :func:`requiretls.dest.open_session`; the first session that qualifies carries
``MAIL FROM:<..> REQUIRETLS``.  When none does, :func:`eligibility.judge` over the sessions tried says bounce
(5.7.30 / 5.7.10) or defer; this module only turns that verdict into the LMTP reply.

Opportunistic (opt-out, RFC 8689 section 4.2.2): STARTTLS without checks when offered, plaintext when not (or
when the handshake fails), ignoring DANE and MTA-STS.
"""

from __future__ import annotations

import contextlib
import enum
import smtplib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from requiretls.dest import Destination, SessionResult, SessionSettings, open_session
from requiretls.dest.session import PinnedSMTP, helo_name, quit_quietly, unverified_context
from requiretls.policy import eligibility
from requiretls.policy.eligibility import Outcome as VerdictOutcome
from requiretls.policy.eligibility import Verdict


class DeliveryStatus(enum.StrEnum):
    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result for one recipient, as the LMTP reply Postfix gets and the log line the admin reads."""

    status: DeliveryStatus
    code: int
    dsn: str
    text: str
    mx: str = ""
    tls: str = ""
    verify: str = ""
    requiretls: bool | None = None

    def lmtp_reply(self) -> str:
        return f"{self.code} {self.dsn} {self.text}"[:500]


@dataclass(frozen=True, slots=True)
class LmtpEnvelope:
    """What Postfix's LMTP client gave: sender, MAIL FROM parameters (SIZE, BODY, SMTPUTF8, RET, ENVID) and
    recipients with their RCPT parameters (NOTIFY, ORCPT)."""

    sender: str
    mail_params: dict[str, str]
    rcpts: tuple[str, ...]
    rcpt_params: dict[str, dict[str, str]] = field(default_factory=dict)


#: What the agent's outbound sessions use: port, timeout, CA file, EHLO name.
SendSettings = SessionSettings


def _mail_options(env: LmtpEnvelope, features: dict[str, str], requiretls: bool) -> list[str]:
    """RFC 8689 §4.2.1 step 6 plus the original SIZE/BODY/SMTPUTF8/ENVID/RET where the MX supports them."""
    opts = ["REQUIRETLS"] if requiretls else []
    p = env.mail_params
    if "size" in features and "SIZE" in p:
        opts.append(f"SIZE={p['SIZE']}")
    if "8bitmime" in features and p.get("BODY", "").upper() == "8BITMIME":
        opts.append("BODY=8BITMIME")
    if "smtputf8" in features and "SMTPUTF8" in p:
        opts.append("SMTPUTF8")
    if "dsn" in features:
        if "RET" in p:
            opts.append(f"RET={p['RET']}")
        if "ENVID" in p:
            opts.append(f"ENVID={p['ENVID']}")
    return opts


def _rcpt_options(env: LmtpEnvelope, rcpt: str, features: dict[str, str]) -> list[str]:
    if "dsn" not in features:
        return []
    return [f"{k}={v}" for k, v in env.rcpt_params.get(rcpt, {}).items() if k in ("NOTIFY", "ORCPT")]


def _reply_outcome(code: int, msg: bytes | str, base: Outcome) -> Outcome:
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else msg
    text = " ".join(text.split())
    dsn = text.split(" ", 1)[0] if text[:2] in ("2.", "4.", "5.") else ""
    rest = text[len(dsn) :].strip() if dsn else text
    if 200 <= code < 300:
        return replace(base, status=DeliveryStatus.SENT, code=250, dsn="2.0.0",
                       text=f"delivered via {base.mx}: {code} {text}")
    if 400 <= code < 500:
        return replace(base, status=DeliveryStatus.DEFERRED, code=code, dsn=dsn or "4.0.0",
                       text=f"{base.mx} said: {rest}")
    return replace(base, status=DeliveryStatus.BOUNCED, code=code if code >= 500 else 554, dsn=dsn or "5.0.0",
                   text=f"{base.mx} said: {rest}")


def _transmit(client: smtplib.SMTP, env: LmtpEnvelope, rcpts: Sequence[str], message: bytes, base: Outcome,
              requiretls: bool) -> dict[str, Outcome]:
    """MAIL, RCPT for each recipient, DATA.  Returns one outcome per recipient."""
    features = client.esmtp_features
    if "SMTPUTF8" in env.mail_params and "smtputf8" not in features:
        o = replace(base, status=DeliveryStatus.BOUNCED, code=553, dsn="5.6.7",
                    text=f"{base.mx} does not support SMTPUTF8, which this message needs")
        return dict.fromkeys(rcpts, o)
    code, msg = client.mail(env.sender, _mail_options(env, features, requiretls))
    if code != 250:
        o = _reply_outcome(code, msg, base)
        return dict.fromkeys(rcpts, o)
    results: dict[str, Outcome] = {}
    accepted: list[str] = []
    for r in rcpts:
        code, msg = client.rcpt(r, _rcpt_options(env, r, features))
        if code in (250, 251):
            accepted.append(r)
        else:
            results[r] = _reply_outcome(code, msg, base)
    if not accepted:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.rset()
        return results
    code, msg = client.data(message)
    for r in accepted:
        results[r] = _reply_outcome(code, msg, base)
    return results


def verdict_outcome(verdict: Verdict) -> Outcome:
    """The LMTP reply for a verdict that does not deliver: 451 (Postfix retries) or 550 (Postfix bounces)."""
    status = DeliveryStatus.DEFERRED if verdict.outcome is VerdictOutcome.DEFER else DeliveryStatus.BOUNCED
    return Outcome(status, verdict.code, verdict.dsn, verdict.reason[:400],
                   requiretls=False if verdict.dsn == eligibility.DSN_NO_REQUIRETLS else None)


def deliver_requiretls(dest: Destination, env: LmtpEnvelope, rcpts: Sequence[str], message: bytes,
                       settings: SendSettings) -> dict[str, Outcome]:
    """RFC 8689 section 4.2.1 delivery to one domain."""
    first = eligibility.judge(dest)
    if not first.deliverable:
        return dict.fromkeys(rcpts, verdict_outcome(first))
    tried: list[SessionResult] = []
    for host in eligibility.candidates(dest):
        names = host.dane_reference_names(dest.domain, dest.canonical)
        for address in host.addresses:
            with open_session(host.name, address, settings, host.usable_tlsa, names) as session:
                tried.append(session.result)
                if session.client is None or not eligibility.qualifies(session.result):
                    continue
                r = session.result
                base = Outcome(DeliveryStatus.DEFERRED, 451, "4.3.0", "", r.where, r.tls_version or "TLS",
                               r.verification, True)
                try:
                    return _transmit(session.client, env, rcpts, message, base, requiretls=True)
                except (smtplib.SMTPException, OSError) as e:
                    return dict.fromkeys(rcpts, replace(base, status=DeliveryStatus.DEFERRED, code=451, dsn="4.4.2",
                                                        text=f"{base.mx}: {e}"))
    return dict.fromkeys(rcpts, verdict_outcome(eligibility.judge(dest, tried)))


def deliver_opportunistic(hosts: Sequence[tuple[str, Sequence[str]]], env: LmtpEnvelope, rcpts: Sequence[str],
                          message: bytes, settings: SendSettings) -> dict[str, Outcome]:
    """RFC 8689 §4.2.2 (``TLS-Required: No``): try STARTTLS, never fail for its sake."""
    errors: list[str] = []
    for name, addresses in hosts:
        for address in addresses:
            for use_tls in (True, False):
                client = PinnedSMTP(local_hostname=helo_name(settings), timeout=settings.timeout)
                client.connect_address = address
                where = f"{name}[{address}]:{settings.port}"
                try:
                    code, _ = client.connect(name, settings.port)
                    if code != 220:
                        errors.append(f"{where}: greeting {code}")
                        break
                    client.ehlo()
                    tls = ""
                    if use_tls and client.has_extn("starttls"):
                        client._host = name  # type: ignore[attr-defined]
                        try:
                            client.starttls(context=unverified_context())
                        except (ssl.SSLError, OSError) as e:
                            errors.append(f"{where}: TLS failed ({e}), retrying in plaintext")
                            continue
                        if isinstance(client.sock, ssl.SSLSocket):  # a refused STARTTLS leaves it in plaintext
                            client.ehlo()
                            tls = client.sock.version() or "TLS"
                    base = Outcome(DeliveryStatus.DEFERRED, 451, "4.3.0", "", where, tls or "none", "none", None)
                    return _transmit(client, env, rcpts, message, base, requiretls=False)
                except (smtplib.SMTPException, OSError) as e:
                    errors.append(f"{where}: {e}")
                    break
                finally:
                    quit_quietly(client)
    return dict.fromkeys(rcpts, Outcome(DeliveryStatus.DEFERRED, 451, "4.4.1", "; ".join(errors)[:300] or "no MX"))
