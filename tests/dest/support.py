"""Real local services for the dest tests: a DNS answer source, a test CA, an HTTPS
server for MTA-STS policies and STARTTLS SMTP servers.  All on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.server
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 20.0) -> T:
    """Run a coroutine with a hard time bound (tests must not hang)."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


# --- DNS ---------------------------------------------------------------------------------


@dataclass
class Reply:
    rrsets: list[str] = field(default_factory=list)  # "name ttl IN TYPE rdata" lines, answer section
    ad: bool = True
    rcode: int = dns.rcode.NOERROR
    ede: int | None = None
    drop: bool = False


class FakeDns:
    """Answers crafted replies over UDP and TCP, as a validating resolver would: with or
    without AD, SERVFAIL with or without an Extended DNS Error, NXDOMAIN, or silence."""

    def __init__(self) -> None:
        self.replies: dict[tuple[str, str], Reply] = {}
        self.default_ad = True
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        outer = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                out = outer.answer(data)
                if out is not None:
                    sock.sendto(out, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                ln = self.request.recv(2)
                if len(ln) < 2:
                    return
                data = b""
                need = int.from_bytes(ln, "big")
                while len(data) < need:
                    chunk = self.request.recv(need - len(data))
                    if not chunk:
                        return
                    data += chunk
                out = outer.answer(data)
                if out is not None:
                    self.request.sendall(len(out).to_bytes(2, "big") + out)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        # UDP and TCP on one port: the kernel picks a free UDP port, which may be busy for TCP (a client's
        # ephemeral port); then try another.
        for attempt in range(50):
            self.udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Udp)
            self.port = self.udp.server_address[1]
            try:
                self.tcp = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Tcp)
                break
            except OSError:
                self.udp.server_close()
                if attempt == 49:
                    raise
        self.threads = [threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True)
                        for s in (self.udp, self.tcp)]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        for s in (self.udp, self.tcp):
            s.shutdown()
            s.server_close()

    # zone building ----------------------------------------------------------------------
    def add(self, name: str, rdtype: str, *rdatas: str, ad: bool = True, ttl: int = 300) -> None:
        key = (name.lower().rstrip("."), rdtype.upper())
        rep = self.replies.setdefault(key, Reply(ad=ad))
        rep.ad = ad
        rep.rrsets.extend(f"{name}. {ttl} IN {rdtype} {r}" for r in rdatas)

    def cname(self, name: str, target: str, rdtype: str, *rdatas: str, ad: bool = True) -> None:
        key = (name.lower().rstrip("."), rdtype.upper())
        lines = [f"{name}. 300 IN CNAME {target}."] + [f"{target}. 300 IN {rdtype} {r}" for r in rdatas]
        self.replies[key] = Reply(lines, ad)

    def empty(self, name: str, rdtype: str, ad: bool = True) -> None:
        self.replies[(name.lower().rstrip("."), rdtype.upper())] = Reply([], ad)

    def nxdomain(self, name: str, rdtype: str, ad: bool = True) -> None:
        self.replies[(name.lower().rstrip("."), rdtype.upper())] = Reply([], ad, dns.rcode.NXDOMAIN)

    def servfail(self, name: str, rdtype: str, ede: int | None = None) -> None:
        self.replies[(name.lower().rstrip("."), rdtype.upper())] = Reply([], False, dns.rcode.SERVFAIL, ede)

    def drop(self, name: str, rdtype: str) -> None:
        self.replies[(name.lower().rstrip("."), rdtype.upper())] = Reply(drop=True)

    def host(self, name: str, address: str = "127.0.0.1", ad: bool = True) -> None:
        self.add(name, "A", address, ad=ad)
        self.empty(name, "AAAA", ad=ad)

    # serving ------------------------------------------------------------------------------
    def answer(self, data: bytes) -> bytes | None:
        q = dns.message.from_wire(data)
        qname = q.question[0].name.to_text(omit_final_dot=True).lower().rstrip(".")  # the root: ""
        qtype = dns.rdatatype.to_text(q.question[0].rdtype)
        with self._lock:
            self.queries.append((qname, qtype))
        rep = self.replies.get((qname, qtype))
        if rep is None:
            rep = Reply([], self.default_ad, dns.rcode.NXDOMAIN)
        if rep.drop:
            return None
        r = dns.message.make_response(q)
        r.flags |= dns.flags.RA
        r.set_rcode(rep.rcode)
        if rep.ad and rep.rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            r.flags |= dns.flags.AD
        for line in rep.rrsets:
            r.answer.append(dns.rrset.from_text(*_split_rr(line)))
        if rep.rcode == dns.rcode.NXDOMAIN or (rep.rcode == dns.rcode.NOERROR and not rep.rrsets):
            r.authority.append(dns.rrset.from_text(
                "test.", 60, "IN", "SOA", "ns.test. hostmaster.test. 1 3600 600 86400 60"))
        if rep.ede is not None:
            r.use_edns(0, 0, 1232, options=[dns.edns.EDEOption(rep.ede)])
        return r.to_wire()


def _split_rr(line: str) -> tuple[str, int, str, str, str]:
    name, ttl, cls, rtype, rdata = line.split(None, 4)
    return name, int(ttl), cls, rtype, rdata


# --- test CA -----------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


class TestCA:
    """A small CA made with ``cryptography``: root, optional intermediate, leaf certificates."""

    __test__ = False

    def __init__(self, name: str = "requiretls test root") -> None:
        self.root = self._make(name, None, ca=True, names=())

    def _make(self, cn: str, issuer: Issued | None, *, ca: bool, names: tuple[str, ...],
              not_before: datetime.datetime | None = None, not_after: datetime.datetime | None = None,
              cn_in_subject: bool = True) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn_in_subject else [])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.cert.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or _now() - datetime.timedelta(days=1))
            .not_valid_after(not_after or _now() + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False), critical=True)
        signer = issuer.key if issuer else key
        return Issued(key, builder.sign(signer, hashes.SHA256()))

    def intermediate(self, cn: str = "requiretls test intermediate") -> Issued:
        return self._make(cn, self.root, ca=True, names=())

    def leaf(self, *names: str, issuer: Issued | None = None, expired: bool = False,
             cn: str | None = None) -> Issued:
        nb = na = None
        if expired:
            nb = _now() - datetime.timedelta(days=60)
            na = _now() - datetime.timedelta(days=1)
        return self._make(cn or (names[0] if names else "leaf"), issuer or self.root, ca=False,
                          names=names, not_before=nb, not_after=na)

    def write_root(self, path: Path) -> str:
        path.write_bytes(self.root.pem)
        return str(path)


def server_context(tmp: Path, leaf: Issued, chain: tuple[Issued, ...] = ()) -> ssl.SSLContext:
    """A server-side SSLContext presenting ``leaf`` and then ``chain``."""
    cert_file = tmp / f"srv-{id(leaf)}.pem"
    key_file = tmp / f"srv-{id(leaf)}.key"
    cert_file.write_bytes(leaf.pem + b"".join(c.pem for c in chain))
    key_file.write_bytes(leaf.key_pem())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


# --- HTTPS server for MTA-STS -----------------------------------------------------------


@dataclass
class HttpAnswer:
    status: int = 200
    body: bytes = b""
    content_type: str | None = "text/plain"
    headers: list[tuple[str, str]] = field(default_factory=list)
    chunked: bool = False
    no_length: bool = False
    delay: float = 0.0
    endless: bool = False  # repeat ``body`` until the client goes away (chunked or no_length framing)
    pause: float = 0.0  # seconds between the parts of an endless body


class PolicyServer:
    """Threaded HTTPS server; per-Host answers; per-SNI certificates."""

    def __init__(self, default_ctx: ssl.SSLContext) -> None:
        self.answers: dict[str, HttpAnswer] = {}
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.requests: list[tuple[str, str]] = []
        self.sni_names: list[str | None] = []
        outer = self

        def sni(sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            outer.sni_names.append(name)
            if name and name in outer.contexts:
                sock.context = outer.contexts[name]

        default_ctx.sni_callback = sni  # type: ignore[assignment]

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").split(":")[0].lower()
                outer.requests.append((host, self.path))
                ans = outer.answers.get(host)
                if ans is None or self.path != "/.well-known/mta-sts.txt":
                    ans = HttpAnswer(404, b"not found\n")
                if ans.delay:
                    time.sleep(ans.delay)
                self.send_response(ans.status)
                if ans.content_type:
                    self.send_header("Content-Type", ans.content_type)
                for k, v in ans.headers:
                    self.send_header(k, v)
                if ans.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                elif not ans.no_length:
                    self.send_header("Content-Length", str(len(ans.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if ans.endless:
                    with contextlib.suppress(OSError):
                        while True:
                            part = ans.body or b"#" * 1000
                            self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n" if ans.chunked else part)
                            self.wfile.flush()
                            if ans.pause:
                                time.sleep(ans.pause)
                elif ans.chunked:
                    for i in range(0, len(ans.body), 1000):
                        part = ans.body[i:i + 1000]
                        self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.wfile.write(ans.body)
                self.close_connection = True

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                sock, addr = super().get_request()
                sock.settimeout(5)
                return default_ctx.wrap_socket(sock, server_side=True), addr

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def policy_text(mode: str = "enforce", mx: tuple[str, ...] = ("mx.good.test",), max_age: int = 86400) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *[f"mx: {m}" for m in mx], f"max_age: {max_age}"]
    return ("\r\n".join(lines) + "\r\n").encode()


# --- SMTP ---------------------------------------------------------------------------------


class SmtpServer:
    """aiosmtpd STARTTLS server; advertises REQUIRETLS after TLS when asked to."""

    def __init__(self, tls_ctx: ssl.SSLContext | None, requiretls: bool = True, starttls: bool = True) -> None:
        from aiosmtpd.controller import Controller

        class Handler:
            async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                                  responses: list[str]) -> list[str]:
                session.host_name = hostname
                if requiretls and session.ssl is not None:
                    responses.insert(len(responses) - 1, "250-REQUIRETLS")
                return responses

            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                return "250 OK"

        kwargs: dict[str, Any] = {}
        if starttls and tls_ctx is not None:
            kwargs["tls_context"] = tls_ctx
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=_free_port(), **kwargs)
        self.controller.start()
        self.port = self.controller.port

    def close(self) -> None:
        self.controller.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
