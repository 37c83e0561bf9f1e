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
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from requiretls.dest import Destination, SessionResult, SessionSettings, open_session
from requiretls.dest.session import (
    PinnedSMTP,
    TlsResumption,
    new_client,
    pkix_context,
    quit_quietly,
    unverified_context,
)
from requiretls.policy import eligibility
from requiretls.policy.eligibility import Outcome as VerdictOutcome
from requiretls.policy.eligibility import Verdict
from requiretls.relay import tlsrpt
from requiretls.relay.mime import Unconvertible, downconvert
from requiretls.relay.spool import Message, as_message, send_data


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

    def delivery_facts(self) -> str:
        """Where and how it went, for the LMTP reply text Postfix logs in its own ``status=sent (...)`` line
        (Postfix's relay= names the agent's socket): ``relay=mx.example[192.0.2.1]:25, tls=TLSv1.3,
        verify=dane, requiretls=yes``."""
        rt = "" if self.requiretls is None else f", requiretls={'yes' if self.requiretls else 'no'}"
        return f"relay={self.mx}, tls={self.tls or 'none'}, verify={self.verify or 'none'}{rt}"

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


#: What the agent's outbound sessions use: port, timeout, CA file, EHLO name, bind addresses.
SendSettings = SessionSettings


@dataclass(frozen=True, slots=True)
class SaslCredentials:
    """A ``user:password`` entry of Postfix's smtp_sasl_password_maps for one next hop."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def parse(cls, value: str) -> SaslCredentials:
        user, sep, password = value.strip().partition(":")
        if not sep or not user:
            raise ValueError("not username:password")
        return cls(user, password)


#: Credentials by remote host name (lower case); the agent looks them up the way Postfix does (next hop as
#: written, then the host name, then the domain) before the delivery starts.
SaslTable = Mapping[str, SaslCredentials]

#: Replies that are about this client, not the message or the recipient: authentication required or failed,
#: or a policy refusal of AUTH.  Postfix's own smtp client defers its configuration errors
#: (smtp_sasl_auth_soft_bounce); a bounce here would lose mail because of our configuration.
_ABOUT_US_CODES = (530, 534, 535, 538)
_ABOUT_US_DSN = ("5.7.8", "5.7.9", "5.7.11", "5.7.14")


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
    if code >= 500 and (code in _ABOUT_US_CODES or dsn in _ABOUT_US_DSN):
        return _about_us(code, dsn, rest, base)
    if 200 <= code < 300:
        return replace(base, status=DeliveryStatus.SENT, code=250, dsn="2.0.0",
                       text=f"{base.delivery_facts()} ({code} {text})")
    if 400 <= code < 500:
        return replace(base, status=DeliveryStatus.DEFERRED, code=code, dsn=dsn or "4.0.0",
                       text=f"{base.mx} said: {rest}")
    return replace(base, status=DeliveryStatus.BOUNCED, code=code if code >= 500 else 554, dsn=dsn or "5.0.0",
                   text=f"{base.mx} said: {rest}")


def _about_us(code: int, dsn: str, text: str, base: Outcome) -> Outcome:
    return replace(base, status=DeliveryStatus.DEFERRED, code=454, dsn="4" + (dsn or "5.7.0")[1:],
                   text=f"{base.mx} said: {code} {dsn} {text} (about this client's authentication: deferred, "
                        "not bounced; check smtp_sasl_password_maps)".replace("  ", " "))


def authenticate(client: smtplib.SMTP, creds: SaslCredentials | None, base: Outcome) -> Outcome | None:
    """SASL AUTH (PLAIN, else LOGIN) over the session's verified TLS; None when it succeeded or is not needed.

    Never in clear: the caller only calls it on a verified TLS session, and it checks the socket again.  A
    server that does not offer AUTH gets the message without it (as Postfix does); a failure defers."""
    if creds is None or not client.has_extn("auth"):
        return None
    if not isinstance(client.sock, ssl.SSLSocket):
        return replace(base, status=DeliveryStatus.DEFERRED, code=454, dsn="4.7.0",
                       text=f"{base.mx}: SASL credentials configured, but no verified TLS: not sent in clear")
    offered = client.esmtp_features.get("auth", "").upper().split()
    mech = next((m for m in ("PLAIN", "LOGIN") if m in offered), None)
    if mech is None:
        return replace(base, status=DeliveryStatus.DEFERRED, code=454, dsn="4.7.0",
                       text=f"{base.mx} offers AUTH {' '.join(offered) or '(none)'}, not PLAIN or LOGIN")
    client.user, client.password = creds.username, creds.password
    authobject = client.auth_plain if mech == "PLAIN" else client.auth_login
    msg: bytes | str
    try:
        code, msg = client.auth(mech, authobject, initial_response_ok=True)
    except smtplib.SMTPAuthenticationError as e:
        code, msg = e.smtp_code, e.smtp_error
    except smtplib.SMTPException as e:
        return replace(base, status=DeliveryStatus.DEFERRED, code=454, dsn="4.7.0",
                       text=f"{base.mx}: SASL AUTH {mech} failed: {e}")
    if code == 235:
        return None
    text = " ".join((msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)).split())
    dsn = text.split(" ", 1)[0] if text[:2] in ("4.", "5.") else ""
    return _about_us(code, dsn, f"SASL AUTH {mech} as {creds.username}: {text[len(dsn):].strip()}", base)


class StaleSession(Exception):
    """A kept session that was found closed at MAIL (no reply, or 421): nothing of the message was sent, so it
    goes on a new session."""


def _transmit(client: smtplib.SMTP, env: LmtpEnvelope, rcpts: Sequence[str], data: bytes | Message, base: Outcome,
              requiretls: bool, reused: bool = False) -> dict[str, Outcome]:
    """MAIL, RCPT for each recipient, DATA (sent from the spool in chunks).  Returns one outcome per recipient.
    On a ``reused`` session a dead connection at MAIL raises :class:`StaleSession`."""
    message = as_message(data)
    features = client.esmtp_features
    if "SMTPUTF8" in env.mail_params and "smtputf8" not in features:
        # RFC 6531 section 3.5: no downgrade here; the sender gets it back.
        o = replace(base, status=DeliveryStatus.BOUNCED, code=553, dsn="5.6.7",
                    text=f"{base.mx} does not support SMTPUTF8, which this message needs")
        return dict.fromkeys(rcpts, o)
    limit = features.get("size", "").strip()
    if limit.isdigit() and int(limit) > 0 and message.size > int(limit):
        # RFC 1870: the MX said it takes at most SIZE bytes; sending would only waste both sides' time.
        o = replace(base, status=DeliveryStatus.BOUNCED, code=552, dsn="5.3.4",
                    text=f"message of {message.size} bytes is larger than {base.mx} accepts (SIZE {limit})")
        return dict.fromkeys(rcpts, o)
    if "8bitmime" not in features and message.has_8bit():
        # RFC 6152 section 3: an MX without 8BITMIME gets 7-bit data, converted as Postfix does.  The conversion
        # works on the whole message: a spooled one is read into memory for it (only in this case).
        try:
            message = Message(downconvert(message.read()))
        except Unconvertible as e:
            o = replace(base, status=DeliveryStatus.BOUNCED, code=554, dsn="5.6.3",
                        text=f"{base.mx} does not support 8BITMIME and the message cannot be converted: {e}")
            return dict.fromkeys(rcpts, o)
    try:
        code, msg = client.mail(env.sender, _mail_options(env, features, requiretls))
    except (smtplib.SMTPServerDisconnected, OSError) as e:
        if reused:
            raise StaleSession(str(e)) from e
        raise
    if reused and code == 421:
        raise StaleSession(msg.decode("utf-8", "replace"))
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
    code, msg = send_data(client, message)
    for r in accepted:
        results[r] = _reply_outcome(code, msg, base)
    return results


def verdict_outcome(verdict: Verdict) -> Outcome:
    """The LMTP reply for a verdict that does not deliver: 451 (Postfix retries) or 550 (Postfix bounces)."""
    status = DeliveryStatus.DEFERRED if verdict.outcome is VerdictOutcome.DEFER else DeliveryStatus.BOUNCED
    return Outcome(status, verdict.code, verdict.dsn, verdict.reason[:400],
                   requiretls=False if verdict.dsn == eligibility.DSN_NO_REQUIRETLS else None)


class SessionCache:
    """Qualified REQUIRETLS sessions kept open for the next message to the same MX (Postfix's connection cache:
    smtp_connection_cache_time_limit 2 s idle, smtp_connection_reuse_time_limit 300 s in all).

    A session is found again only under everything that made it qualify: host, address, port, the TLSA records
    and DANE names it was verified against, the EHLO name and bind addresses, the SASL user.  It is kept only
    after a completed transaction (so it needs no RSET); one found closed at the next MAIL is dropped and the
    message goes on a new session.  Thread-safe (the
    deliveries run in threads); a daemon thread closes idle sessions."""

    def __init__(self, idle: float = 2.0, max_age: float = 300.0, per_key: int = 20) -> None:
        self.idle, self.max_age, self.per_key = idle, max_age, per_key
        self._lock = threading.Lock()
        self._free: dict[tuple[object, ...], list[tuple[PinnedSMTP, SessionResult, float, float]]] = {}
        self._janitor: threading.Thread | None = None
        self.reused = 0
        #: TLS sessions for resumption when a new connection to the same MX is made.
        self.tls = TlsResumption()

    @staticmethod
    def key(host: str, address: str, settings: SendSettings, tlsa: Sequence[object], names: Sequence[str],
            creds: SaslCredentials | None) -> tuple[object, ...]:
        return (host.lower(), address, settings, tuple(tlsa), tuple(names), creds)

    def take(self, key: tuple[object, ...]) -> tuple[PinnedSMTP, SessionResult, float] | None:
        now = time.monotonic()
        stale: list[PinnedSMTP] = []
        found = None
        with self._lock:
            free = self._free.get(key, [])
            while free:
                client, result, born, idle_since = free.pop()
                if now - idle_since <= self.idle and now - born <= self.max_age:
                    found = (client, result, born)
                    break
                stale.append(client)
            if not free:
                self._free.pop(key, None)
        for c in stale:
            quit_quietly(c)
        return found

    def give(self, key: tuple[object, ...], client: PinnedSMTP, result: SessionResult, born: float) -> None:
        now = time.monotonic()
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) >= self.per_key or now - born > self.max_age:
                extra: PinnedSMTP | None = client
            else:
                free.append((client, result, born, now))
                extra = None
            if self._janitor is None:
                self._janitor = threading.Thread(target=self._sweep, name="session-cache", daemon=True)
                self._janitor.start()
        if extra is not None:
            quit_quietly(extra)

    def prune(self, everything: bool = False) -> int:
        now = time.monotonic()
        old: list[PinnedSMTP] = []
        with self._lock:
            for key in list(self._free):
                keep = []
                for item in self._free[key]:
                    if everything or now - item[3] > self.idle or now - item[2] > self.max_age:
                        old.append(item[0])
                    else:
                        keep.append(item)
                if keep:
                    self._free[key] = keep
                else:
                    del self._free[key]
        for c in old:
            quit_quietly(c)
        return len(old)

    def _sweep(self) -> None:
        while True:
            time.sleep(min(1.0, self.idle / 2 or 1.0))
            self.prune()


def _send_on(client: PinnedSMTP, r: SessionResult, env: LmtpEnvelope, rcpts: Sequence[str],
             message: bytes | Message,
             creds: SaslCredentials | None, authenticated: bool,
             reused: bool = False) -> tuple[dict[str, Outcome], bool]:
    """One transaction over a qualified session; also whether the session can carry another one.  A kept
    (``reused``) session found dead before the MX took MAIL raises :class:`StaleSession`."""
    base = Outcome(DeliveryStatus.DEFERRED, 451, "4.3.0", "", r.where, r.tls_version or "TLS", r.verification, True)
    try:
        if not authenticated:
            refused = authenticate(client, creds, base)
            if refused is not None:
                return dict.fromkeys(rcpts, refused), False
        return _transmit(client, env, rcpts, message, base, requiretls=True, reused=reused), True
    except StaleSession:
        raise
    except (smtplib.SMTPException, OSError) as e:
        return dict.fromkeys(rcpts, replace(base, status=DeliveryStatus.DEFERRED, code=451, dsn="4.4.2",
                                            text=f"{base.mx}: {e}")), False


def deliver_requiretls(dest: Destination, env: LmtpEnvelope, rcpts: Sequence[str],
                       message: bytes | Message,
                       settings: SendSettings, sasl: SaslTable | None = None,
                       cache: SessionCache | None = None) -> dict[str, Outcome]:
    """RFC 8689 section 4.2.1 delivery to one domain; SASL AUTH after the verified TLS handshake when
    ``sasl`` has credentials for the host.  With a ``cache``, a session kept from an earlier message to the same
    host (verified the same way) is used first, and a session that is still good afterwards is kept."""
    first = eligibility.judge(dest)
    if not first.deliverable:
        return dict.fromkeys(rcpts, verdict_outcome(first))
    tried: list[SessionResult] = []
    for host in eligibility.candidates(dest):
        names = host.dane_reference_names(dest.domain, dest.canonical)
        creds = (sasl or {}).get(host.name.lower())
        for address in host.addresses:
            key = SessionCache.key(host.name, address, settings, host.usable_tlsa, names, creds)
            kept = cache.take(key) if cache is not None else None
            if kept is not None:
                # No RSET first: a session is kept only after a completed transaction, which leaves it reset
                # (RFC 5321 section 4.1.4); a session the MX has closed meanwhile shows at MAIL, before any of
                # the message is sent, and the message goes on a new one.
                client, r, born = kept
                try:
                    out, good = _send_on(client, r, env, rcpts, message, creds, True, reused=True)
                except StaleSession:
                    quit_quietly(client)
                else:
                    assert cache is not None
                    cache.reused += 1
                    if good:
                        cache.give(key, client, r, born)
                    else:
                        quit_quietly(client)
                    return out
            with open_session(host.name, address, settings, host.usable_tlsa, names,
                              resumption=cache.tls if cache is not None else None) as session:
                tried.append(session.result)
                tlsrpt.session(dest, session.result)
                if session.client is None or not eligibility.qualifies(session.result):
                    continue
                out, good = _send_on(session.client, session.result, env, rcpts, message, creds, False)
                if good and cache is not None:
                    cache.give(key, session.client, session.result, time.monotonic())
                    session.client = None  # kept open: the context manager must not close it
                return out
    return dict.fromkeys(rcpts, verdict_outcome(eligibility.judge(dest, tried)))


def opportunistic_settings(settings: SendSettings) -> SendSettings:
    """The settings of an opportunistic session (``TLS-Required: No``).  Opportunistic TLS is not mandatory
    TLS: Postfix's smtp_tls_mandatory_* do not apply (a 1.2-only MX would otherwise get the message in
    plaintext); smtp_tls_protocols, smtp_tls_ciphers and smtp_tls_exclude_ciphers do, never below the agent's
    own floor, TLS 1.2."""
    return replace(settings, tls_min_version=settings.opportunistic_min_version,
                   high_ciphers=settings.opportunistic_high_ciphers, mandatory_exclude_ciphers=())


def deliver_opportunistic(hosts: Sequence[tuple[str, Sequence[str]]], env: LmtpEnvelope, rcpts: Sequence[str],
                          message: bytes | Message, settings: SendSettings,
                          sasl: SaslTable | None = None) -> dict[str, Outcome]:
    """RFC 8689 §4.2.2 (``TLS-Required: No``): try STARTTLS, never fail for its sake.  With SASL credentials
    for a host the handshake is PKIX-verified (``settings.cafile``) and AUTH follows only then; a host whose
    certificate does not verify gets the message in plaintext without AUTH (and defers it if it wants AUTH)."""
    errors: list[str] = []
    loose = opportunistic_settings(settings)
    for name, addresses in hosts:
        creds = (sasl or {}).get(name.lower())
        for address in addresses:
            for use_tls in (True, False):
                client = new_client(settings, address)
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
                            client.starttls(context=pkix_context(loose) if creds else unverified_context(loose))
                        except (ssl.SSLError, OSError) as e:
                            errors.append(f"{where}: TLS failed ({e}), retrying in plaintext")
                            continue
                        if isinstance(client.sock, ssl.SSLSocket):  # a refused STARTTLS leaves it in plaintext
                            client.ehlo()
                            tls = client.sock.version() or "TLS"
                    client.step_timeout(settings.timeout)
                    verified = bool(tls and creds)
                    base = Outcome(DeliveryStatus.DEFERRED, 451, "4.3.0", "", where, tls or "none",
                                   "pkix" if verified else "none", None)
                    if verified:
                        refused = authenticate(client, creds, base)
                        if refused is not None:
                            return dict.fromkeys(rcpts, refused)
                    return _transmit(client, env, rcpts, message, base, requiretls=False)
                except (smtplib.SMTPException, OSError) as e:
                    errors.append(f"{where}: {e}")
                    break
                finally:
                    quit_quietly(client)
    return dict.fromkeys(rcpts, Outcome(DeliveryStatus.DEFERRED, 451, "4.4.1", "; ".join(errors)[:300] or "no MX"))
