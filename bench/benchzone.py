"""A self-contained MTA-STS world for benchmarks: a throwaway CA, an authoritative DNS server for ``bench.`` and
an HTTPS server for the policies, all on one loopback address.

For ``dN.bench`` (1 <= N <= domains):

* ``dN.bench MX 10 mx.dN.bench``, ``mx.dN.bench A <mx_ip>`` (never contacted), no AAAA;
* ``_mta-sts.dN.bench TXT "v=STSv1; id=1"`` (RFC 8461 §3.1);
* ``mta-sts.dN.bench A <ip>``, serving ``/.well-known/mta-sts.txt`` on port 443: mode enforce, ``mx: mx.dN.bench``
  (RFC 8461 §3.2), certificate from the test CA;
* ``_25._tcp.mx.dN.bench TLSA`` and every other name: NXDOMAIN (other types of the names above: NODATA).

Everything runs on one asyncio loop in a daemon thread (:class:`BenchZone`); counters tell whether the daemons
under test still ask DNS or fetch policies while they are measured (with a warm cache they must not).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import re
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ZONE = dns.name.from_text("bench.")
TTL = 86400
_NAME = re.compile(r"(?:(_mta-sts|mta-sts|mx|_25\._tcp\.mx)\.)?d([1-9][0-9]{0,5})\.bench\.")


def expected_answer(n: int) -> str:
    """The socketmap reply (without framing) both daemons must give for ``dN.bench``."""
    return f"OK secure match=mx.d{n}.bench servername=hostname"


def policy_text(n: int) -> str:
    return f"version: STSv1\nmode: enforce\nmx: mx.d{n}.bench\nmax_age: 604800\n"


@dataclass(frozen=True)
class Pki:
    cafile: Path
    certfile: Path
    keyfile: Path


def make_pki(directory: Path, domains: int) -> Pki:
    """A test CA and one server certificate naming every ``mta-sts.dN.bench`` (a wildcard ``*.bench`` would not
    cover two labels)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "requiretls bench throwaway CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(f"mta-sts.d{n}.bench") for n in range(1, domains + 1)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mta-sts.d1.bench")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "bench-ca.pem", directory / "mta-sts.pem", directory / "mta-sts.key")
    pki.cafile.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    return pki


class Counters:
    def __init__(self) -> None:
        self.dns_queries = 0
        self.policy_fetches = 0

    def snapshot(self) -> tuple[int, int]:
        return self.dns_queries, self.policy_fetches


class _Zone:
    def __init__(self, domains: int, ip: str, mx_ip: str) -> None:
        self.domains = domains
        self.ip = ip
        self.mx_ip = mx_ip
        self.soa = dns.rrset.from_text(ZONE, TTL, "IN", "SOA", "ns.bench. hostmaster.bench. 1 3600 600 86400 86400")

    def rrset(self, qname: dns.name.Name,
              rdtype: dns.rdatatype.RdataType) -> tuple[dns.rcode.Rcode, dns.rrset.RRset | None]:
        """(rcode, answer RRset or None for NODATA/NXDOMAIN)."""
        text = qname.to_text().lower()
        if qname == ZONE:
            if rdtype == dns.rdatatype.SOA:
                return dns.rcode.NOERROR, self.soa
            if rdtype == dns.rdatatype.NS:
                return dns.rcode.NOERROR, dns.rrset.from_text(ZONE, TTL, "IN", "NS", "ns.bench.")
            return dns.rcode.NOERROR, None
        if text == "ns.bench.":
            if rdtype == dns.rdatatype.A:
                return dns.rcode.NOERROR, dns.rrset.from_text(qname, TTL, "IN", "A", self.ip)
            return dns.rcode.NOERROR, None
        m = _NAME.fullmatch(text)
        if m is None or int(m.group(2)) > self.domains or m.group(1) == "_25._tcp.mx":
            return dns.rcode.NXDOMAIN, None
        label, n = m.group(1), int(m.group(2))
        want = {
            None: (dns.rdatatype.MX, f"10 mx.d{n}.bench."),
            "_mta-sts": (dns.rdatatype.TXT, '"v=STSv1; id=1"'),
            "mta-sts": (dns.rdatatype.A, self.ip),
            "mx": (dns.rdatatype.A, self.mx_ip),
        }[label]
        if rdtype != want[0]:
            return dns.rcode.NOERROR, None
        return dns.rcode.NOERROR, dns.rrset.from_text(qname, TTL, "IN", dns.rdatatype.to_text(want[0]), want[1])

    def respond(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # garbage: no answer, like many authoritative servers
            return None
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        resp.flags &= ~dns.flags.RA
        if len(query.question) != 1:
            resp.set_rcode(dns.rcode.FORMERR)
            return resp.to_wire()
        q = query.question[0]
        if q.rdclass != dns.rdataclass.IN or not q.name.is_subdomain(ZONE):
            resp.flags &= ~dns.flags.AA
            resp.set_rcode(dns.rcode.REFUSED)
            return resp.to_wire()
        rcode, rrset = self.rrset(q.name, q.rdtype)
        resp.set_rcode(rcode)
        if rrset is not None:
            resp.answer.append(rrset)
        else:
            resp.authority.append(self.soa)
        return resp.to_wire()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, zone: _Zone, counters: Counters) -> None:
        self.zone = zone
        self.counters = counters
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.counters.dns_queries += 1
        out = self.zone.respond(data)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


class BenchZone:
    """DNS (UDP and TCP port 53) and HTTPS (port 443) on ``ip``, served from a daemon thread."""

    def __init__(self, ip: str, mx_ip: str, domains: int, pki: Pki) -> None:
        ipaddress.IPv4Address(ip)
        self.ip = ip
        self.zone = _Zone(domains, ip, mx_ip)
        self.domains = domains
        self.pki = pki
        self.counters = Counters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="benchzone", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("bench DNS/HTTPS servers did not start")
        if self._error is not None:
            raise RuntimeError(f"bench DNS/HTTPS servers failed: {self._error}") from self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(5.0)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported to start(); the thread must not die silently
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        udp, _ = await self._loop.create_datagram_endpoint(lambda: _Udp(self.zone, self.counters),
                                                          local_addr=(self.ip, 53))
        tcp = await asyncio.start_server(self._dns_tcp, self.ip, 53, reuse_address=True)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.pki.certfile, self.pki.keyfile)
        https = await asyncio.start_server(self._https, self.ip, 443, ssl=ctx, reuse_address=True, backlog=512)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            udp.close()
            for srv in (tcp, https):
                srv.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(srv.wait_closed(), 2.0)

    async def _dns_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), 10.0)
                wire = await asyncio.wait_for(reader.readexactly(int.from_bytes(head, "big")), 10.0)
                self.counters.dns_queries += 1
                out = self.zone.respond(wire)
                if out is None:
                    break
                writer.write(len(out).to_bytes(2, "big") + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def _https(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # without it a reply split over two segments can wait ~40 ms for a delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            lines = head.decode("latin-1").split("\r\n")
            method, _, rest = lines[0].partition(" ")
            path = rest.partition(" ")[0]
            host = ""
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "host":
                    host = value.strip().lower().removesuffix(":443")
            m = _NAME.fullmatch(host + ".")
            if (method == "GET" and path == "/.well-known/mta-sts.txt" and m is not None
                    and m.group(1) == "mta-sts" and int(m.group(2)) <= self.domains):
                self.counters.policy_fetches += 1
                body = policy_text(int(m.group(2))).encode()
                status = "200 OK"
            else:
                body, status = b"not found\n", "404 Not Found"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2.0)
