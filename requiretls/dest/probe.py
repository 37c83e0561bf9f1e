"""REQUIRETLS probe: EHLO, STARTTLS, certificate verification, EHLO again (RFC 8689 section 4.2.1,
RFC 3207 section 4.2).

Uses :mod:`smtplib` in a worker thread: it is the standard library's SMTP
client and the probe is short.  The connection goes to an address chosen from
our own DNS answers, while SNI and the PKIX host-name check use the MX name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import smtplib
import socket
import ssl
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .cache import Cache, MemoryCache, SingleFlight
from .dane import TlsaRecord, leaf_summary, match_tlsa
from .destination import Destination, MxHost
from .errors import CacheError, CertificateParseError


@dataclass(frozen=True)
class ProbeSettings:
    port: int = 25
    timeout: float = 20.0
    cafile: str | None = None  # None: the system trust store
    helo_name: str | None = None  # None: socket.getfqdn()
    cache_ttl: float = 300.0
    failure_cache_ttl: float = 60.0


@dataclass(frozen=True)
class ProbeResult:
    """What one MX showed.  ``tls_ok``: STARTTLS done and the certificate authenticated."""

    host: str
    address: str = ""
    port: int = 25
    connected: bool = False
    starttls: bool = False
    tls_version: str = ""
    cipher: str = ""
    verification: str = ""  # "pkix" or "dane"
    verified: bool = False
    verify_error: str = ""
    requiretls: bool = False
    extensions: tuple[str, ...] = ()
    certificate: dict[str, str] = field(default_factory=dict)
    error: str = ""
    cached: bool = False

    @property
    def tls_ok(self) -> bool:
        return self.starttls and self.verified

    @property
    def requiretls_ok(self) -> bool:
        """All of RFC 8689 section 4.2.1 steps 3-5 passed on this host."""
        return self.tls_ok and self.requiretls

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extensions"] = list(self.extensions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        d = dict(d)
        d["extensions"] = tuple(d.get("extensions", ()))
        return cls(**d)


class _PinnedSMTP(smtplib.SMTP):
    """smtplib client that connects to a given address but keeps the MX name for SNI."""

    connect_address: str = ""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return socket.create_connection((self.connect_address, port), timeout,
                                        self.source_address)


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


def pkix_context(cafile: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def dane_context() -> ssl.SSLContext:
    """No PKIX checks: DANE authenticates the chain after the handshake (RFC 7672 section 3)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def probe_sync(host: str, addresses: Sequence[str], settings: ProbeSettings,
               tlsa: Sequence[TlsaRecord] = (), dane_names: Sequence[str] = (),
               sni: str | None = None) -> ProbeResult:
    """Probe one MX host (blocking).  With usable ``tlsa`` records DANE authenticates the
    server; otherwise PKIX with ``settings.cafile`` and the MX name as reference identifier."""
    mode = "dane" if tlsa else "pkix"
    errors: list[str] = []
    helo = settings.helo_name or socket.getfqdn()
    for address in addresses:
        client = _PinnedSMTP(local_hostname=helo, timeout=settings.timeout)
        client.connect_address = address
        try:
            try:
                code, _banner = client.connect(host, settings.port)
            except (OSError, smtplib.SMTPException) as e:
                errors.append(f"[{address}]: {e}")
                continue
            if code != 220:
                errors.append(f"[{address}]: greeting {code}")
                client.close()
                continue
            return _session(client, host, address, settings, mode, tlsa, dane_names, sni or host)
        finally:
            client.close()
    return ProbeResult(host, port=settings.port, verification=mode,
                       error="; ".join(errors) or "no address to connect to")


def _session(client: _PinnedSMTP, host: str, address: str, settings: ProbeSettings, mode: str,
             tlsa: Sequence[TlsaRecord], dane_names: Sequence[str], sni: str) -> ProbeResult:
    base = ProbeResult(host, address, settings.port, connected=True, verification=mode)
    try:
        code, _ = client.ehlo()
        if code != 250:
            return _with(base, error=f"EHLO answered {code}")
        if not client.has_extn("starttls"):
            return _with(base, error="STARTTLS not offered", extensions=tuple(sorted(client.esmtp_features)))
        ctx = dane_context() if mode == "dane" else pkix_context(settings.cafile)
        client._host = sni  # type: ignore[attr-defined]  # smtplib uses it as SNI server_hostname
        try:
            client.starttls(context=ctx)
        except ssl.SSLCertVerificationError as e:
            return _with(base, verify_error=f"certificate not valid: {e.verify_message}",
                         error="certificate verification failed")
        except (ssl.SSLError, smtplib.SMTPException, OSError) as e:
            return _with(base, error=f"STARTTLS failed: {e}")
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        chain = peer_chain(sock)
        cert: dict[str, str] = {}
        try:
            cert = leaf_summary(chain[0]) if chain else {}
        except CertificateParseError:
            cert = {}
        version = sock.version() or ""
        cipher_info = sock.cipher()
        cipher = cipher_info[0] if cipher_info else ""
        verified, verify_error = True, ""
        if mode == "dane":
            try:
                dane = match_tlsa(tlsa, chain, dane_names)
                verified = dane.authenticated
                verify_error = "" if verified else f"DANE: {dane.outcome.value} {dane.detail}".strip()
            except CertificateParseError as e:
                verified, verify_error = False, f"DANE: {e}"
        code, _ = client.ehlo()
        features = tuple(sorted(client.esmtp_features))
        result = _with(base, starttls=True, tls_version=version, cipher=cipher, verified=verified,
                       verify_error=verify_error, certificate=cert, extensions=features,
                       requiretls=code == 250 and client.has_extn("requiretls"))
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
        return result
    except (smtplib.SMTPException, OSError) as e:
        return _with(base, error=f"SMTP dialogue failed: {e}")


def _with(base: ProbeResult, **changes: Any) -> ProbeResult:
    d = asdict(base)
    d.update(changes)
    d["extensions"] = tuple(d["extensions"])
    return ProbeResult(**d)


class Prober:
    """Asynchronous, cached, single-flight REQUIRETLS probes."""

    def __init__(self, settings: ProbeSettings | None = None, cache: Cache | None = None) -> None:
        self.settings = settings or ProbeSettings()
        self.cache: Cache = cache if cache is not None else MemoryCache()
        self._flight: SingleFlight[ProbeResult] = SingleFlight()

    async def probe_host(self, dest: Destination, host: MxHost) -> ProbeResult:
        """Probe ``host`` of ``dest``: DANE when it has usable TLSA records, else PKIX."""
        tlsa = host.usable_tlsa
        mode = "dane" if tlsa else "pkix"
        key = f"probe:{host.name}:{self.settings.port}:{mode}"
        try:
            raw = await self.cache.get(key)
            if raw is not None:
                return _with(ProbeResult.from_dict(json.loads(raw)), cached=True)
        except (CacheError, ValueError, TypeError, KeyError):
            pass
        names = host.dane_reference_names(dest.domain, dest.canonical)

        async def run() -> ProbeResult:
            result = await asyncio.to_thread(probe_sync, host.name, host.addresses, self.settings, tlsa, names,
                                             host.tlsa_base or host.name)
            ttl = self.settings.cache_ttl if result.connected and not result.error else self.settings.failure_cache_ttl
            with contextlib.suppress(CacheError):
                await self.cache.set(key, json.dumps(result.to_dict()).encode(), ttl)
            return result

        return await self._flight.run(key, run)

    async def probe_destination(self, dest: Destination, all_hosts: bool = False) -> dict[str, ProbeResult]:
        """Probe the REQUIRETLS candidates of ``dest`` (or every usable host) concurrently."""
        hosts = [h for h in dest.hosts if h.usable] if all_hosts else list(dest.requiretls_candidates())
        results = await asyncio.gather(*(self.probe_host(dest, h) for h in hosts))
        return {h.name: r for h, r in zip(hosts, results, strict=True)}
