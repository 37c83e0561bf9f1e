"""A configurable SMTP server a test starts in its own process (aiosmtpd in a thread): a relay that requires
SASL AUTH (PLAIN/LOGIN, only after STARTTLS), or an MX without 8BITMIME / SMTPUTF8 / with a small SIZE.

It advertises REQUIRETLS after STARTTLS, accepts the DSN parameters, and keeps every accepted message in
memory (:attr:`RelayServer.deliveries`) with the client's address, EHLO name and authenticated user, so a
test asserts on what really arrived.  Used by the e2e tests (bound to an MX address of the bed on a spare
port, with a certificate of the bed's CA) and by unit tests (127.0.0.1, any CA)."""

from __future__ import annotations

import contextlib
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass(frozen=True)
class Received:
    peer: str
    peer_port: int
    helo: str | None
    auth_user: str | None
    tls: bool
    mail_from: str
    mail_options: tuple[str, ...]
    rcpt_tos: tuple[str, ...]
    raw: bytes

    @property
    def requiretls(self) -> bool:
        return any(o.upper() == "REQUIRETLS" for o in self.mail_options)


@dataclass
class RelayOptions:
    users: dict[str, str] = field(default_factory=dict)  # non-empty: AUTH required (after STARTTLS only)
    eightbitmime: bool = True
    smtputf8: bool = True
    size: int = 0  # > 0: advertised SIZE, larger messages refused
    requiretls: bool = True
    one_transaction: bool = False  # a connection's second MAIL gets 421 and the connection is closed


class _Smtp(SMTP):
    async def smtp_MAIL(self, arg: str) -> None:
        handler = self.event_handler
        if (isinstance(handler, _Handler) and handler.server.options.one_transaction
                and getattr(self, "_rtls_delivered", False)):
            await self.push("421 4.4.2 relay.test closing: one transaction per connection")
            if self.transport is not None:
                self.transport.close()
            return
        await super().smtp_MAIL(arg)

    async def smtp_RSET(self, arg: str) -> None:
        handler = self.event_handler
        if isinstance(handler, _Handler):
            handler.server.rsets += 1
        await super().smtp_RSET(arg)

    def _getparams(self, params: Any) -> Any:
        result = super()._getparams(params)
        if result is not None:
            for k in ("REQUIRETLS", "RET", "ENVID", "NOTIFY", "ORCPT"):
                result.pop(k, None)
        return result


class _Handler:
    def __init__(self, server: RelayServer) -> None:
        self.server = server

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        opts = self.server.options
        out = [r for r in responses if not (r[4:].upper() == "8BITMIME" and not opts.eightbitmime)]
        extra = ["250-DSN"]
        if opts.requiretls and session.ssl:
            extra.append("250-REQUIRETLS")
        return out[:-1] + extra + out[-1:]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        if any(o.upper() == "REQUIRETLS" for o in options) and not session.ssl:
            return "555 5.5.4 Unsupported option: REQUIRETLS"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if self.server.options.size and len(raw) > self.server.options.size:
            return "552 5.3.4 message too big"
        user = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        self.server.deliveries.append(Received(
            peer=session.peer[0] if session.peer else "", peer_port=session.peer[1] if session.peer else 0,
            helo=session.host_name, auth_user=user,
            tls=bool(session.ssl), mail_from=envelope.mail_from or "", mail_options=tuple(envelope.mail_options),
            rcpt_tos=tuple(envelope.rcpt_tos), raw=raw))
        server._rtls_delivered = True  # type: ignore[attr-defined]
        return "250 2.0.0 stored"


class _Controller(Controller):
    def __init__(self, server: RelayServer, host: str, port: int) -> None:
        self.relay = server
        super().__init__(_Handler(server), hostname=host, port=port, ready_timeout=10)

    def factory(self) -> SMTP:
        o = self.relay.options

        def check(_server: SMTP, _session: Session, _envelope: Envelope, mechanism: str,
                  auth_data: Any) -> AuthResult:
            ok = (isinstance(auth_data, LoginPassword)
                  and o.users.get(auth_data.login.decode()) == auth_data.password.decode())
            self.relay.auth_attempts.append((mechanism, auth_data.login.decode() if ok else "", ok))
            return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

        return _Smtp(self.handler, tls_context=self.relay.tls, require_starttls=False,
                     auth_required=bool(o.users), auth_require_tls=True, authenticator=check,
                     enable_SMTPUTF8=o.smtputf8, data_size_limit=o.size or None, decode_data=False,
                     hostname=self.relay.name)

    def _trigger_server(self) -> None:  # the default one speaks plain SMTP to a TLS-less check: just connect
        import socket

        with contextlib.ExitStack() as stack:
            s = stack.enter_context(socket.create_connection((self.hostname, self.port), 5))
            s.recv(1024)


class RelayServer:
    """``with RelayServer(ctx, "127.0.0.1", port, RelayOptions(users={"u": "p"})) as r: ... r.deliveries``"""

    def __init__(self, tls: ssl.SSLContext, host: str, port: int, options: RelayOptions | None = None,
                 name: str = "relay.test") -> None:
        self.tls = tls
        self.name = name
        self.options = options or RelayOptions()
        self.deliveries: list[Received] = []
        self.auth_attempts: list[tuple[str, str, bool]] = []
        self.rsets = 0  # RSET commands received
        self._lock = threading.Lock()
        self.controller = _Controller(self, host, port)

    def __enter__(self) -> RelayServer:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.controller.stop()
