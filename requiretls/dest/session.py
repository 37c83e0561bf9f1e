"""The one SMTP TLS-session routine: connect, EHLO, STARTTLS, DANE or PKIX, EHLO again (RFC 8689 section 4.2.1
steps 3-5, RFC 3207 section 4.2, RFC 7672 section 3).

The probe (``requiretls check --probe``, the milter's pre-flight) and the delivery agent both use
:func:`open_session`; it reports what happened as a :class:`requiretls.facts.SessionResult` and never decides
whether that is good enough: :func:`requiretls.policy.eligibility.judge` does.  The agent keeps the live client
of a session that got to the end and sends the message over it.

smtplib is the standard library's SMTP client.  The connection goes to an address from our own DNS answers,
while SNI and the PKIX host-name check use the MX name.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType

from requiretls.facts import SessionResult, SessionStage, TlsaRecord

from .dane import leaf_summary, match_tlsa
from .errors import CertificateParseError

#: Failures that say nothing about the MX's TLS: the connection broke, timed out or was refused.
_TRANSIENT = (ConnectionError, TimeoutError, socket.timeout, ssl.SSLEOFError, smtplib.SMTPServerDisconnected)


@dataclass(frozen=True)
class SessionSettings:
    port: int = 25
    timeout: float = 20.0  # each SMTP step without a timeout of its own
    cafile: str | None = None  # None: the system trust store (with capath: both)
    helo_name: str = ""  # "": socket.getfqdn()
    bind_address: str = ""  # local IPv4 address for outbound connections (Postfix's smtp_bind_address)
    bind_address6: str = ""  # local IPv6 address (smtp_bind_address6)
    capath: str | None = None  # a hashed CA directory (Postfix's smtp_tls_CApath), with or without cafile
    tls_min_version: str = "TLSv1.2"  # "TLSv1.2" or "TLSv1.3" (smtp_tls_mandatory_protocols can only raise it)
    high_ciphers: bool = False  # TLS 1.2 cipher suites of grade HIGH only (smtp_tls_mandatory_ciphers = high)
    #: OpenSSL cipher names or types never used (smtp_tls_exclude_ciphers): each is appended as "!NAME", so
    #: only ever fewer suites.  mandatory_exclude_ciphers (smtp_tls_mandatory_exclude_ciphers) too, except
    #: where the caller drops it for opportunistic TLS, as Postfix does.
    exclude_ciphers: tuple[str, ...] = ()
    mandatory_exclude_ciphers: tuple[str, ...] = ()
    #: Opportunistic TLS (opt-out mail): its own floor and grade (smtp_tls_protocols, smtp_tls_ciphers), as
    #: Postfix keeps them apart from the mandatory ones; a handshake they refuse falls back to plaintext.
    opportunistic_min_version: str = "TLSv1.2"
    opportunistic_high_ciphers: bool = False

    @property
    def excluded(self) -> tuple[str, ...]:
        return self.exclude_ciphers + self.mandatory_exclude_ciphers
    connect_timeout: float = 0.0  # TCP connect (smtp_connect_timeout); 0: timeout
    helo_timeout: float = 0.0  # greeting, EHLO, STARTTLS and the handshake (smtp_helo_timeout); 0: timeout
    data_done_timeout: float = 0.0  # the reply after the final dot (smtp_data_done_timeout); 0: timeout


class PinnedSMTP(smtplib.SMTP):
    """smtplib client that connects to a given address but keeps the MX name for SNI, from the configured
    local address of that address family when there is one."""

    connect_address: str = ""
    bind: tuple[str, str] = ("", "")  # (IPv4, IPv6) local addresses

    connect_timeout: float = 0.0
    #: After the connection is made, until the session is ready for MAIL: greeting, EHLO, STARTTLS.
    helo_timeout: float = 0.0
    #: The wait for the reply after the final dot (used by the agent's DATA).
    data_done_timeout: float = 0.0

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        local = self.bind[1 if ":" in self.connect_address else 0]
        source = (local, 0) if local else self.source_address
        sock = socket.create_connection((self.connect_address, port), self.connect_timeout or timeout, source)
        # smtplib writes each command, and the message's last piece and final dot, in writes of their own; with
        # Nagle's algorithm a small write waits for the ACK of the one before, which the MX delays (40 ms on
        # Linux): every message waited that long for its final reply.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.helo_timeout or timeout)
        return sock

    def step_timeout(self, seconds: float) -> None:
        """The time limit for what is read and written next on the open connection."""
        if self.sock is not None:
            self.sock.settimeout(seconds)


def new_client(settings: SessionSettings, address: str) -> PinnedSMTP:
    """A client for ``address`` with the settings' EHLO name, timeouts and bind addresses."""
    client = PinnedSMTP(local_hostname=helo_name(settings), timeout=settings.timeout)
    client.connect_address = address
    client.bind = (settings.bind_address, settings.bind_address6)
    client.connect_timeout = settings.connect_timeout
    client.helo_timeout = settings.helo_timeout
    client.data_done_timeout = settings.data_done_timeout
    return client


def peer_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """The chain the server sent (leaf first).  Python < 3.13 has it only privately."""
    getter = getattr(sock, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(sock, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        try:
            chain = getter()
            out: list[bytes] = []
            for cert in chain or ():
                if isinstance(cert, bytes):
                    out.append(cert)
                else:
                    out.append(bytes(cert.public_bytes(ssl._ssl.ENCODING_DER)))  # type: ignore[attr-defined]
            if out:
                return out
        except (AttributeError, ValueError, ssl.SSLError):
            pass
    leaf = sock.getpeercert(binary_form=True)
    return [leaf] if leaf else []


_MIN_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


_CIPHER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+.-]*")


def _harden(ctx: ssl.SSLContext, min_version: str, high_ciphers: bool,
            exclude: tuple[str, ...] = ()) -> ssl.SSLContext:
    # Never below TLS 1.2, whatever is asked; an unknown name is the floor too.
    ctx.minimum_version = max(_MIN_VERSIONS.get(min_version, ssl.TLSVersion.TLSv1_2), ssl.TLSVersion.TLSv1_2)
    removed = [f"!{name}" for name in exclude if _CIPHER_NAME.fullmatch(name)]
    if high_ciphers:
        removed[:0] = ["!MEDIUM", "!LOW", "!EXP", "!aNULL", "!eNULL"]
    if removed:
        # Python's own list minus what is excluded: only ever fewer suites than the default (TLS 1.2 and below;
        # TLS 1.3 suites are all of grade HIGH and not touched by a cipher list, as in Postfix).
        default = ":".join(c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3")
        ctx.set_ciphers(":".join([default, *removed]))
    return ctx


#: One context per parameter set, made under a lock: two threads must never build two contexts for the same
#: parameters (a TLS session kept from one cannot be offered on the other).
_CONTEXTS: dict[tuple[object, ...], ssl.SSLContext] = {}
_CONTEXTS_LOCK = threading.Lock()


def _shared(key: tuple[object, ...], make: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(key)
        if ctx is None:
            if len(_CONTEXTS) >= 64:
                _CONTEXTS.clear()  # a context in use stays valid; only its sessions stop being offered
            ctx = _CONTEXTS[key] = make()
        return ctx


def _pkix(cafile: str | None, capath: str | None, min_version: str, high_ciphers: bool,
          exclude: tuple[str, ...] = ()) -> ssl.SSLContext:
    def make() -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile, capath=capath)
        return _harden(ctx, min_version, high_ciphers, exclude)

    return _shared(("pkix", cafile, capath, min_version, high_ciphers, exclude), make)


def _unverified(min_version: str, high_ciphers: bool, exclude: tuple[str, ...] = ()) -> ssl.SSLContext:
    def make() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return _harden(ctx, min_version, high_ciphers, exclude)

    return _shared(("none", min_version, high_ciphers, exclude), make)


def pkix_context(settings: SessionSettings | str | None) -> ssl.SSLContext:
    """The PKIX context for ``settings`` (CA file and/or directory, protocol floor, ciphers), or for a CA file
    alone.  One shared context per set of parameters (contexts are safe to share between threads; loading the
    CA bundle once, and TLS session resumption needs the same context)."""
    if not isinstance(settings, SessionSettings):
        return _pkix(settings, None, "TLSv1.2", False)
    return _pkix(settings.cafile, settings.capath, settings.tls_min_version, settings.high_ciphers,
                 settings.excluded)


def unverified_context(settings: SessionSettings | None = None) -> ssl.SSLContext:
    """No PKIX checks: DANE authenticates the chain after the handshake (RFC 7672 section 3), and
    opportunistic TLS (RFC 8689 section 4.2.2) does not authenticate at all."""
    if settings is None:
        return _unverified("TLSv1.2", False)
    return _unverified(settings.tls_min_version, settings.high_ciphers, settings.excluded)


class TlsResumption:
    """TLS sessions kept for the next handshake with the same server (session resumption: one round trip and
    no certificate exchange less).  A session is offered again only under everything its first handshake was
    verified with: host, address, port, SNI name, the DANE records and names or the PKIX trust (CA file and
    directory), the protocol floor and ciphers.  A resumed DANE session is checked against the chain stored in
    the session, as a new one would be.  Thread-safe; at most ``size`` entries (the oldest go)."""

    def __init__(self, size: int = 1000) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._sessions: dict[tuple[object, ...], ssl.SSLSession] = {}
        self.resumed = 0

    @staticmethod
    def key(base: SessionResult, settings: SessionSettings, mode: str, tlsa: Sequence[TlsaRecord],
            dane_names: Sequence[str], sni: str) -> tuple[object, ...]:
        trust = () if mode == "dane" else (settings.cafile, settings.capath)
        return (mode, base.host.lower(), base.address, settings.port, sni.lower(), tuple(tlsa),
                tuple(n.lower() for n in dane_names), trust, settings.tls_min_version, settings.high_ciphers,
                settings.excluded)

    def get(self, key: tuple[object, ...]) -> ssl.SSLSession | None:
        with self._lock:
            return self._sessions.get(key)

    def put(self, key: tuple[object, ...], session: ssl.SSLSession | None) -> None:
        with self._lock:
            if session is None:
                self._sessions.pop(key, None)
                return
            self._sessions.pop(key, None)
            self._sessions[key] = session
            while len(self._sessions) > self.size:
                del self._sessions[next(iter(self._sessions))]


class _Resuming:
    """What smtplib's starttls() calls ``context``: wraps with the kept session (a session of another context
    is not offered)."""

    def __init__(self, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> None:
        self.ctx, self.session = ctx, session

    def wrap_socket(self, sock: socket.socket, server_hostname: str | None = None) -> ssl.SSLSocket:
        # The session is set on the wrapped socket before the handshake, not passed to wrap_socket(): there a
        # refused session ("Session refers to a different SSLContext") raises after the plain socket was
        # detached, and its descriptor is lost (EBADF on any retry).
        tls = self.ctx.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
        if self.session is not None:
            with contextlib.suppress(ValueError):
                tls.session = self.session
        tls.do_handshake()
        return tls


def helo_name(settings: SessionSettings) -> str:
    return settings.helo_name or socket.getfqdn()


class TlsSession:
    """One session's result and, when it reached :attr:`SessionStage.DONE`, its open client.

    A context manager: leaving it sends QUIT (best effort) and closes the connection.
    """

    def __init__(self, result: SessionResult, client: PinnedSMTP | None) -> None:
        self.result = result
        self.client = client

    def close(self) -> None:
        if self.client is not None:
            quit_quietly(self.client)
            self.client = None

    def __enter__(self) -> TlsSession:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def quit_quietly(client: smtplib.SMTP) -> None:
    with contextlib.suppress(smtplib.SMTPException, OSError):
        client.quit()
    client.close()


def open_session(host: str, address: str, settings: SessionSettings, tlsa: Sequence[TlsaRecord] = (),
                 dane_names: Sequence[str] = (), sni: str | None = None,
                 resumption: TlsResumption | None = None) -> TlsSession:
    """Run the session with ``host`` at ``address`` (blocking).

    With usable ``tlsa`` records DANE authenticates the server against ``dane_names`` (RFC 7672 section 3.2);
    otherwise PKIX with ``settings.cafile`` and ``host`` as the reference identifier.  The client stays open
    only when the session got to the end (authenticated TLS and a post-TLS EHLO answered 250); the caller
    reads :attr:`SessionResult.requiretls` and decides.
    """
    mode = "dane" if tlsa else "pkix"
    base = SessionResult(host, address, settings.port, verification=mode)
    client = new_client(settings, address)
    try:
        result = _dialogue(client, base, settings, mode, tlsa, dane_names, sni or host, resumption)
    except _TRANSIENT as e:
        result = replace(base, transient=True, error=f"connection lost: {e or type(e).__name__}")
    except (smtplib.SMTPException, OSError) as e:
        result = replace(base, transient=True, error=f"SMTP dialogue failed: {e or type(e).__name__}")
    if result.stage is SessionStage.DONE and not result.transient:
        return TlsSession(result, client)
    quit_quietly(client)
    return TlsSession(result, None)


def _dialogue(client: PinnedSMTP, base: SessionResult, settings: SessionSettings, mode: str,
              tlsa: Sequence[TlsaRecord], dane_names: Sequence[str], sni: str,
              resumption: TlsResumption | None = None) -> SessionResult:
    try:
        code, _ = client.connect(base.host, settings.port)
    except (OSError, smtplib.SMTPException) as e:
        return replace(base, transient=True, error=f"connect: {e or type(e).__name__}")
    r = replace(base, connected=True)
    if code != 220:
        return replace(r, transient=True, error=f"greeting {code}")
    r = replace(r, stage=SessionStage.EHLO)
    code, _ = client.ehlo()
    if code != 250:
        # A refused EHLO (554 "you are blocked") is about this client, not about the MX's TLS: like a refused
        # greeting it defers (Postfix's smtp client bounces nothing for its own standing either).
        return replace(r, transient=True, error=f"EHLO answered {code}")
    r = replace(r, stage=SessionStage.STARTTLS, extensions=tuple(sorted(client.esmtp_features)))
    if not client.has_extn("starttls"):
        return replace(r, error="STARTTLS not offered")
    ctx = unverified_context(settings) if mode == "dane" else pkix_context(settings)
    client._host = sni  # type: ignore[attr-defined]  # smtplib uses it as SNI server_hostname
    key = TlsResumption.key(base, settings, mode, tlsa, dane_names, sni) if resumption is not None else ()
    kept = resumption.get(key) if resumption is not None else None
    try:
        code, msg = client.starttls(context=_Resuming(ctx, kept))  # type: ignore[call-overload]
    except ssl.SSLCertVerificationError as e:
        return replace(r, stage=SessionStage.HANDSHAKE, verify_error=f"certificate not valid: {e.verify_message}",
                       error="certificate verification failed")
    except _TRANSIENT as e:
        return replace(r, stage=SessionStage.HANDSHAKE, transient=True,
                       error=f"connection lost during TLS handshake: {e or type(e).__name__}")
    except ssl.SSLError as e:
        return replace(r, stage=SessionStage.HANDSHAKE, error=f"TLS handshake failed: {e}")
    except OSError as e:  # not a TLS answer from the server (a local socket error): says nothing about its TLS
        return replace(r, stage=SessionStage.HANDSHAKE, transient=True, error=f"TLS handshake failed: {e}")
    sock = client.sock
    if code != 220 or not isinstance(sock, ssl.SSLSocket):
        text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
        return replace(r, transient=400 <= code < 500, error=f"STARTTLS answered {code} {text}"[:200])
    r = replace(r, stage=SessionStage.AUTHENTICATE, starttls=True, tls_version=sock.version() or "",
                cipher=(sock.cipher() or ("",))[0])
    chain = peer_chain(sock)
    with contextlib.suppress(CertificateParseError):
        r = replace(r, certificate=leaf_summary(chain[0]) if chain else {})
    if mode == "dane":
        try:
            dane = match_tlsa(tlsa, chain, dane_names)
        except CertificateParseError as e:
            return replace(r, verify_error=f"DANE: {e}", error="DANE authentication failed")
        if not dane.authenticated:
            return replace(r, verify_error=f"DANE: {dane.outcome.value} {dane.detail}".strip(),
                           error="DANE authentication failed")
    r = replace(r, stage=SessionStage.EHLO_TLS, verified=True)
    code, _ = client.ehlo()
    if code != 250:
        return replace(r, transient=True, error=f"EHLO after STARTTLS answered {code}")
    client.step_timeout(settings.timeout)  # from now on MAIL, RCPT, DATA: the ordinary step limit
    if resumption is not None and isinstance(client.sock, ssl.SSLSocket):
        # Kept only now: the handshake was verified (DANE or PKIX) and the server answered EHLO over it.
        if client.sock.session_reused:
            resumption.resumed += 1
        resumption.put(key, client.sock.session)
    return replace(r, stage=SessionStage.DONE, extensions=tuple(sorted(client.esmtp_features)),
                   requiretls=client.has_extn("requiretls"))
