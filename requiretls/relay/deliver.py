"""Outbound delivery of one message to one destination domain (blocking; the agent runs it in a thread).

REQUIRETLS (RFC 8689 §4.2.1): every MX in preference order; an MX that is not DNSSEC-secure must be listed by
MTA-STS; STARTTLS; the certificate authenticated by DANE (usable TLSA) or PKIX (name = MX host); EHLO after
TLS lists REQUIRETLS; then ``MAIL FROM:<..> REQUIRETLS``.  A failed MX gets QUIT.  When none qualifies:
5.7.30 if authenticated TLS worked but REQUIRETLS was not offered, 5.7.10 if no authenticated TLS was possible;
a connection failure or DNS trouble defers instead (the next try may find the MX that works).

Opportunistic (opt-out, RFC 8689 §4.2.2): STARTTLS without checks when offered, plaintext when not (or when the
handshake fails), ignoring DANE and MTA-STS.
"""

from __future__ import annotations

import contextlib
import enum
import smtplib
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from requiretls.dest import Destination, MxHost, TlsRequirement
from requiretls.dest.dane import match_tlsa
from requiretls.dest.errors import CertificateParseError
from requiretls.dest.probe import _PinnedSMTP, dane_context, peer_chain, pkix_context


class Status(enum.StrEnum):
    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result for one recipient, as the LMTP reply Postfix gets and the log line the admin reads."""

    status: Status
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
class Envelope:
    """What Postfix's LMTP client gave: sender, MAIL FROM parameters (SIZE, BODY, SMTPUTF8, RET, ENVID) and
    recipients with their RCPT parameters (NOTIFY, ORCPT)."""

    sender: str
    mail_params: dict[str, str]
    rcpts: tuple[str, ...]
    rcpt_params: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SendSettings:
    helo_name: str = ""
    timeout: float = 60.0
    cafile: str | None = None
    port: int = 25


@dataclass(slots=True)
class _Attempt:
    """Why the MX hosts failed, to pick the final code."""

    transient: list[str] = field(default_factory=list)
    no_requiretls: list[str] = field(default_factory=list)
    no_auth_tls: list[str] = field(default_factory=list)


def _helo(settings: SendSettings) -> str:
    return settings.helo_name or socket.getfqdn()


def _mail_options(env: Envelope, features: dict[str, str], requiretls: bool) -> list[str]:
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


def _rcpt_options(env: Envelope, rcpt: str, features: dict[str, str]) -> list[str]:
    if "dsn" not in features:
        return []
    return [f"{k}={v}" for k, v in env.rcpt_params.get(rcpt, {}).items() if k in ("NOTIFY", "ORCPT")]


def _reply_outcome(code: int, msg: bytes | str, base: Outcome) -> Outcome:
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else msg
    text = " ".join(text.split())
    dsn = text.split(" ", 1)[0] if text[:2] in ("2.", "4.", "5.") else ""
    rest = text[len(dsn) :].strip() if dsn else text
    if 200 <= code < 300:
        return replace(base, status=Status.SENT, code=250, dsn="2.0.0", text=f"delivered via {base.mx}: {code} {text}")
    if 400 <= code < 500:
        return replace(base, status=Status.DEFERRED, code=code, dsn=dsn or "4.0.0", text=f"{base.mx} said: {rest}")
    return replace(base, status=Status.BOUNCED, code=code if code >= 500 else 554, dsn=dsn or "5.0.0",
                   text=f"{base.mx} said: {rest}")


def _transmit(client: smtplib.SMTP, env: Envelope, rcpts: Sequence[str], message: bytes, base: Outcome,
              requiretls: bool) -> dict[str, Outcome]:
    """MAIL, RCPT for each recipient, DATA.  Returns one outcome per recipient."""
    features = client.esmtp_features
    if "SMTPUTF8" in env.mail_params and "smtputf8" not in features:
        o = replace(base, status=Status.BOUNCED, code=553, dsn="5.6.7",
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


def _tls_session(host: MxHost, address: str, dest_domain: str, settings: SendSettings,
                 attempt: _Attempt) -> tuple[_PinnedSMTP, Outcome] | None:
    """Connect, EHLO, STARTTLS, authenticate, EHLO again, require REQUIRETLS.  None: try the next MX."""
    client = _PinnedSMTP(local_hostname=_helo(settings), timeout=settings.timeout)
    client.connect_address = address
    where = f"{host.name}[{address}]:{settings.port}"
    try:
        code, _ = client.connect(host.name, settings.port)
        if code != 220:
            attempt.transient.append(f"{where}: greeting {code}")
            client.close()
            return None
        code, _ = client.ehlo()
        if code != 250 or not client.has_extn("starttls"):
            attempt.no_auth_tls.append(f"{where}: STARTTLS not offered")
            _quit(client)
            return None
        mode = "dane" if host.usable_tlsa else "pkix"
        client._host = host.name  # type: ignore[attr-defined]  # SNI and the PKIX reference identifier
        try:
            client.starttls(context=dane_context() if mode == "dane" else pkix_context(settings.cafile))
        except ssl.SSLCertVerificationError as e:
            attempt.no_auth_tls.append(f"{where}: certificate not valid: {e.verify_message}")
            client.close()
            return None
        except (ConnectionError, TimeoutError, ssl.SSLEOFError, smtplib.SMTPServerDisconnected) as e:
            # The connection broke during the handshake: nothing says TLS is impossible; try again later.
            attempt.transient.append(f"{where}: connection lost during TLS handshake: {e}")
            client.close()
            return None
        except (ssl.SSLError, OSError) as e:
            attempt.no_auth_tls.append(f"{where}: TLS handshake failed: {e}")
            client.close()
            return None
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        if mode == "dane":
            try:
                result = match_tlsa(host.usable_tlsa, peer_chain(sock), host.dane_reference_names(dest_domain))
                ok, why = result.authenticated, f"{result.outcome.value} {result.detail}".strip()
            except CertificateParseError as e:
                ok, why = False, str(e)
            if not ok:
                attempt.no_auth_tls.append(f"{where}: DANE authentication failed: {why}")
                _quit(client)
                return None
        version = sock.version() or "TLS"
        code, _ = client.ehlo()
        if code != 250 or not client.has_extn("requiretls"):
            attempt.no_requiretls.append(f"{where}: REQUIRETLS not offered after STARTTLS")
            _quit(client)
            return None
        base = Outcome(Status.DEFERRED, 451, "4.3.0", "", where, version, mode, True)
        return client, base
    except (smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError, OSError) as e:
        attempt.transient.append(f"{where}: {e}")
        client.close()
        return None
    except smtplib.SMTPException as e:
        attempt.transient.append(f"{where}: {e}")
        _quit(client)
        return None


def _quit(client: smtplib.SMTP) -> None:
    with contextlib.suppress(smtplib.SMTPException, OSError):
        client.quit()
    client.close()


def _final(attempt: _Attempt, rcpts: Sequence[str]) -> dict[str, Outcome]:
    if attempt.transient:
        o = Outcome(Status.DEFERRED, 451, "4.4.1", "no MX usable now: " + "; ".join(attempt.transient)[:300])
    elif attempt.no_requiretls:
        o = Outcome(Status.BOUNCED, 550, "5.7.30", "REQUIRETLS support required: " + "; ".join(
            attempt.no_requiretls + attempt.no_auth_tls)[:300], requiretls=False)
    else:
        o = Outcome(Status.BOUNCED, 550, "5.7.10", "Encryption needed: no authenticated TLS to a validated MX: "
                    + "; ".join(attempt.no_auth_tls)[:300])
    return dict.fromkeys(rcpts, o)


def deliver_requiretls(dest: Destination, env: Envelope, rcpts: Sequence[str], message: bytes,
                       settings: SendSettings) -> dict[str, Outcome]:
    """RFC 8689 §4.2.1 delivery to one domain."""
    if dest.requirement is TlsRequirement.DEFER:
        return dict.fromkeys(rcpts, Outcome(Status.DEFERRED, 451, "4.4.3", f"DNS trouble: {dest.reason}"))
    if dest.requirement is TlsRequirement.NO_MAIL:
        return dict.fromkeys(rcpts, Outcome(Status.BOUNCED, 550, "5.1.2", f"{dest.domain}: {dest.reason}"))
    attempt = _Attempt()
    for host in dest.hosts:
        if not host.usable:
            # A DNS failure for this MX (address or TLSA lookup) may clear up: defer rather than bounce.
            (attempt.transient if host.dns_trouble else attempt.no_auth_tls).append(
                f"{host.name}: {host.problem}")
            continue
        if not dest.mx_validated(host):
            attempt.no_auth_tls.append(f"{host.name}: MX neither DNSSEC-signed nor listed by MTA-STS")
            continue
        for address in host.addresses:
            session = _tls_session(host, address, dest.domain, settings, attempt)
            if session is None:
                continue
            client, base = session
            try:
                return _transmit(client, env, rcpts, message, base, requiretls=True)
            except (smtplib.SMTPException, OSError) as e:
                o = replace(base, status=Status.DEFERRED, code=451, dsn="4.4.2", text=f"{base.mx}: {e}")
                return dict.fromkeys(rcpts, o)
            finally:
                _quit(client)
    return _final(attempt, rcpts)


def deliver_opportunistic(hosts: Sequence[tuple[str, Sequence[str]]], env: Envelope, rcpts: Sequence[str],
                          message: bytes, settings: SendSettings) -> dict[str, Outcome]:
    """RFC 8689 §4.2.2 (``TLS-Required: No``): try STARTTLS, never fail for its sake."""
    errors: list[str] = []
    for name, addresses in hosts:
        for address in addresses:
            for use_tls in (True, False):
                client = _PinnedSMTP(local_hostname=_helo(settings), timeout=settings.timeout)
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
                            client.starttls(context=dane_context())
                        except (ssl.SSLError, OSError) as e:
                            errors.append(f"{where}: TLS failed ({e}), retrying in plaintext")
                            continue
                        client.ehlo()
                        assert isinstance(client.sock, ssl.SSLSocket)
                        tls = client.sock.version() or "TLS"
                    base = Outcome(Status.DEFERRED, 451, "4.3.0", "", where, tls or "none", "none", None)
                    return _transmit(client, env, rcpts, message, base, requiretls=False)
                except (smtplib.SMTPException, OSError) as e:
                    errors.append(f"{where}: {e}")
                    break
                finally:
                    _quit(client)
    return dict.fromkeys(rcpts, Outcome(Status.DEFERRED, 451, "4.4.1", "; ".join(errors)[:300] or "no MX"))
