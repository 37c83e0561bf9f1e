"""The bed's network services in one process: every test MX (aiosmtpd) and the MTA-STS HTTPS server.

Run as ``python -m tests.testbed.services STATE_DIR``; the bed starts it detached so that ``up`` can leave
it running.  Each MX records every accepted message (envelope, ESMTP parameters, TLS facts, the raw
message) and every connection under ``STATE_DIR/mx/<key>/``, so tests in any process assert on what
really arrived, not on what Postfix says it sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.server
import itertools
import json
import os
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from .hosts import DOMAIN_BY_NAME, DOMAINS, HTTPS_IP, MX_HOSTS, MxHost, StsHttp, domain_mx_hosts
from .pki import Pki
from .records import CUTS_FILE, FAULT_FILE, STALL_FILE, STALL_MAX

POLICY_PATH = "/.well-known/mta-sts.txt"
OVERSIZE_BYTES = 70_000  # RFC 8461 3.3: policies larger than 64 KiB must be rejected
_seq = itertools.count()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _tls_facts(session: Session) -> dict[str, Any]:
    if not session.ssl:
        return {"tls": False, "tls_version": None, "tls_cipher": None}
    obj = session.ssl.get("ssl_object")
    return {
        "tls": True,
        "tls_version": obj.version() if obj else None,
        "tls_cipher": obj.cipher()[0] if obj and obj.cipher() else None,
    }


def _transaction_facts(session: Session, envelope: Envelope) -> dict[str, Any]:
    """What the records of a delivery and of a cut DATA transaction share: client, TLS state, envelope."""
    return {
        "peer": f"{session.peer[0]}:{session.peer[1]}" if session.peer else "",
        "helo": session.host_name,
        **_tls_facts(session),
        "mail_from": envelope.mail_from,
        "rcpt_tos": envelope.rcpt_tos,
    }


class RecordingSMTP(SMTP):
    """aiosmtpd's SMTP, plus the ESMTP parameters a real MX must accept (REQUIRETLS, DSN's RET/ENVID/
    NOTIFY/ORCPT) and a per-connection record written when the connection ends."""

    def _getparams(self, params: Any) -> Any:
        result = super()._getparams(params)
        if result is not None:
            for k in ("REQUIRETLS", "RET", "ENVID", "NOTIFY", "ORCPT"):
                result.pop(k, None)
        return result

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        # Called again with the TLS transport after STARTTLS: keep what the plaintext part recorded.
        if not hasattr(self, "_rtls_commands"):
            self._rtls_commands: list[str] = []
            self._rtls_tls_seen: dict[str, Any] = {"tls": False, "tls_version": None, "tls_cipher": None}
            self._rtls_delivered = 0
        self._rtls_raw_args = ""

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._rtls_raw_args = arg or ""
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._rtls_raw_args = arg or ""
        await super().smtp_RCPT(arg)

    def raw_options(self) -> list[str]:
        """The ESMTP parameters as sent (aiosmtpd upper-cases them; ENVID and ORCPT are case-sensitive)."""
        return self._rtls_raw_args.partition(">")[2].split()

    def connection_lost(self, error: Exception | None) -> None:
        handler: MxHandler = self.event_handler
        rec = {
            "at": _now(),
            "peer": f"{self.session.peer[0]}:{self.session.peer[1]}"
            if self.session and self.session.peer
            else "",
            **self._rtls_tls_seen,
            "commands": self._rtls_commands,
            "delivered": self._rtls_delivered,
        }
        with open(handler.directory / "connections.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        handler: MxHandler = self.event_handler
        env = self.envelope
        helo = self.session.host_name if self.session else None
        rule = size = None
        if not arg and helo and env is not None and env.rcpt_tos:
            announced = next((o.partition("=")[2] for o in env.mail_options if o.upper().startswith("SIZE=")), "")
            size = int(announced) if announced.isdigit() else None
            rule = handler.faults.take(helo, size, env.rcpt_tos)
        if rule is None:
            await super().smtp_DATA(arg)
            return
        await self._cut_mid_data(rule, handler, size)

    async def _cut_mid_data(self, rule: int, handler: MxHandler, size: int | None) -> None:
        """The data-cut fault (``MxRecorder.cut_data``): answer DATA with 354, read the first part of the
        message, never the final dot, then reset the TCP connection without a reply and record nothing."""
        assert self.envelope is not None and self.session is not None
        self._rtls_commands.append("DATA")
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        want = handler.faults.after_bytes(rule)
        got: list[bytes] = []
        n, dot = 0, False
        while n < want:
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as e:  # a line longer than the reader's limit: take a piece
                line = await self._reader.read(e.consumed)
            if line == b".\r\n":
                dot = True  # the message was shorter than after_bytes: the record says so
                break
            got.append(line)
            n += len(line)
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None:
            with contextlib.suppress(OSError):  # linger 0: close() sends RST, not FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._rtls_commands.append(f"CUT after {n} bytes of DATA")
        rec = {
            "at": _now(),
            "mx": handler.mx.key,
            "rule": rule,
            **_transaction_facts(self.session, self.envelope),
            "size": size,
            "bytes_read": n,
            "dot_seen": dot,
            "partial": b"".join(got).decode("latin-1"),
        }
        with open(handler.directory / CUTS_FILE, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if isinstance(self.transport, asyncio.Transport):
            self.transport.abort()
        # Buffered input (the rest of the message, pipelined commands) must not be read as commands: wait for
        # connection_lost, which cancels this coroutine.
        await asyncio.sleep(60)

    async def smtp_STARTTLS(self, arg: str) -> None:
        self._rtls_commands.append("STARTTLS")
        await super().smtp_STARTTLS(arg)
        if self.session is not None and self.session.ssl:
            self._rtls_tls_seen = _tls_facts(self.session)


class DataFaults:
    """The data-cut switch of one MX, read from ``<mx dir>/FAULT_FILE`` (written by ``MxRecorder.cut_data``).

    The file holds ``{"id": ..., "rules": [{"count", "every", "helo", "min_size", "rcpt_prefix",
    "after_bytes"}, ...]}``.  Rule i cuts every ``every``-th DATA transaction from a client whose EHLO/HELO name
    is ``helo`` (any client if null), if ``min_size`` is set whose MAIL FROM said SIZE >= min_size, and if
    ``rcpt_prefix`` is set with a recipient whose local part starts with it, until it has cut ``count``; the
    first rule with cuts left that matches takes the transaction.  Counters
    live here (one process serves every MX) and start again when the file's id changes.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / FAULT_FILE
        self._stamp: tuple[int, int] | None = None
        self._id: str | None = None
        self._rules: list[dict[str, Any]] = []
        self._seen: list[int] = []
        self._cut: list[int] = []

    def _load(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._id, self._rules = None, None, []
            return
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            spec = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # being replaced: keep the previous state until the next DATA
        self._stamp = stamp
        if spec.get("id") != self._id:
            self._id = spec.get("id")
            self._rules = list(spec.get("rules", []))
            self._seen = [0] * len(self._rules)
            self._cut = [0] * len(self._rules)

    def take(self, helo: str, size: int | None, rcpts: list[str]) -> int | None:
        """The index of the rule that cuts this DATA transaction, or None to deliver it normally."""
        self._load()
        for i, r in enumerate(self._rules):
            if self._cut[i] >= r["count"] or (r.get("helo") and r["helo"].lower() != helo.lower()):
                continue
            if r.get("min_size") and (size is None or size < r["min_size"]):
                continue
            if r.get("rcpt_prefix") and not any(a.lower().startswith(r["rcpt_prefix"].lower()) for a in rcpts):
                continue
            self._seen[i] += 1
            if self._seen[i] % max(1, r.get("every", 1)) == 0:
                self._cut[i] += 1
                return i
            return None
        return None

    def after_bytes(self, rule: int) -> int:
        return int(self._rules[rule].get("after_bytes", 1024))


class MxHandler:
    """Hooks for one MX: what it advertises, which recipients it refuses, how it records deliveries.

    Recipient local parts starting with ``reject`` get 550 5.7.1 and ``defer`` get 450 4.7.1, so tests can
    provoke bounces and deferrals on any MX.
    """

    def __init__(self, mx: MxHost, directory: Path) -> None:
        self.mx = mx
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.faults = DataFaults(directory)

    async def handle_EHLO(
        self, server: RecordingSMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        server._rtls_commands.append(f"EHLO {hostname}")
        session.host_name = hostname
        extra = ["250-DSN"]
        if self.mx.requiretls and session.ssl:
            extra.append("250-REQUIRETLS")
        return responses[:-1] + extra + responses[-1:]

    async def handle_MAIL(
        self, server: RecordingSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        options = server.raw_options() or options
        server._rtls_commands.append(" ".join(["MAIL", f"<{address}>", *options]))
        if "REQUIRETLS" in (o.upper() for o in options) and not (self.mx.requiretls and session.ssl):
            return "555 5.5.4 Unsupported option: REQUIRETLS"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: RecordingSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        options = server.raw_options() or options
        server._rtls_commands.append(" ".join(["RCPT", f"<{address}>", *options]))
        local = address.split("@", 1)[0].lower()
        if local.startswith("reject"):
            return "550 5.7.1 rejected by test MX"
        if local.startswith("defer"):
            return "450 4.7.1 deferred by test MX"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(" ".join(options))
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: RecordingSMTP, session: Session, envelope: Envelope) -> str:
        server._rtls_commands.append("DATA")
        name = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}-{os.getpid()}-{next(_seq):06d}"
        raw = envelope.original_content or b""
        _write_atomic(self.directory / f"{name}.eml", raw)
        rec = {
            "mx": self.mx.key,
            "received_at": _now(),
            **_transaction_facts(session, envelope),
            "mail_options": envelope.mail_options,
            "rcpt_options": envelope.rcpt_options,
            "eml": f"{name}.eml",
        }
        _write_atomic(self.directory / f"{name}.json", json.dumps(rec, indent=1).encode())
        server._rtls_delivered += 1
        return "250 2.0.0 stored"


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


# --- MTA-STS HTTPS ----------------------------------------------------------------------------------


def policy_text(domain: str) -> str:
    d = DOMAIN_BY_NAME[domain]
    assert d.sts is not None
    mx = d.sts.mx or tuple(m.hostname for m in domain_mx_hosts(d))
    lines = ["version: STSv1", f"mode: {d.sts.mode}", *(f"mx: {m}" for m in mx), f"max_age: {d.sts.max_age}"]
    return "\r\n".join(lines) + "\r\n"


class _StsHandler(http.server.BaseHTTPRequestHandler):
    server_version = "rtls-testbed-sts/1"
    protocol_version = "HTTP/1.1"
    log_dir: Path

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(
        self, status: int, body: bytes, ctype: str = "text/plain", extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _stalled(self, domain: str) -> bool:
        try:
            return domain in (self.log_dir / STALL_FILE).read_text().split()
        except FileNotFoundError:
            return False

    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").split(":")[0].lower().rstrip(".")
        domain = host.removeprefix("mta-sts.")
        # The stall fault (Bed.sts_stall): hold the request without a byte of answer while the domain is listed
        # (at most STALL_MAX seconds), so that a client's fetch times out; afterwards answer normally.
        end = time.monotonic() + STALL_MAX
        while self._stalled(domain) and time.monotonic() < end:
            time.sleep(0.1)
        d = DOMAIN_BY_NAME.get(domain)
        status = 404
        if self.path != POLICY_PATH or d is None or d.sts is None or not host.startswith("mta-sts."):
            self._send(404, b"not found\n")
        elif d.sts.http is StsHttp.REDIRECT:
            status = 301
            self._send(301, b"moved\n", extra={"Location": f"https://mta-sts.sts.test{POLICY_PATH}"})
        else:
            status = 200
            body = policy_text(domain).encode()
            ctype = "text/plain"
            if d.sts.http is StsHttp.OVERSIZE:
                pad = b"".join(b"x-padding: " + b"a" * 64 + b"\r\n" for _ in range(OVERSIZE_BYTES // 77 + 1))
                body += pad
            elif d.sts.http is StsHttp.MEDIA_TYPE:
                ctype = "text/html"
            self._send(200, body, ctype)
        with open(self.log_dir / "requests.jsonl", "a") as f:
            f.write(json.dumps({"at": _now(), "host": host, "path": self.path, "status": status}) + "\n")


class _StsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, pki: Pki, log_dir: Path) -> None:
        self.contexts: dict[str, ssl.SSLContext] = {}
        for d in DOMAINS:
            if d.sts is not None:
                f = pki.sts(d.domain)
                self.contexts[f"mta-sts.{d.domain}"] = _server_context(f.cert, f.key)
        default = self.contexts["mta-sts.sts.test"]
        listen_ctx = _server_context(pki.sts("sts.test").cert, pki.sts("sts.test").key)
        listen_ctx.sni_callback = self._sni
        self.listen_ctx = listen_ctx
        self.default_ctx = default
        handler = type("Handler", (_StsHandler,), {"log_dir": log_dir})
        super().__init__((HTTPS_IP, 443), handler)

    def _sni(self, sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        if name and name.lower() in self.contexts:
            sock.context = self.contexts[name.lower()]
        return None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(10)
        return self.listen_ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # failed handshakes (the bad-cert host) are expected


# --- main -------------------------------------------------------------------------------------------


async def _serve(state: Path) -> None:
    pki = Pki(state / "pki")
    loop = asyncio.get_running_loop()
    servers = []
    for m in MX_HOSTS:
        handler = MxHandler(m, state / "mx" / m.key)
        ctx = _server_context(pki.mx(m.key).cert, pki.mx(m.key).key) if m.starttls else None

        def factory(handler: MxHandler = handler, ctx: ssl.SSLContext | None = ctx, m: MxHost = m) -> SMTP:
            return RecordingSMTP(
                handler, hostname=m.hostname, tls_context=ctx, require_starttls=False, timeout=60
            )

        servers.append(await loop.create_server(factory, host=m.ip, port=25, reuse_address=True))
    (state / "https").mkdir(parents=True, exist_ok=True)
    https = _StsServer(pki, state / "https")
    t = threading.Thread(target=https.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    stop = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    (state / "services.ready").write_text(f"{os.getpid()}\n")
    await stop.wait()
    for srv in servers:
        srv.close()
    https.shutdown()
    https.server_close()


def main() -> None:
    asyncio.run(_serve(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
