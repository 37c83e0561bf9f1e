"""Real DNSSEC for the bed: NSD serves a private signed root, ``test.`` and the child zones; Unbound
validates.

The root is ours too, so the validator's trust anchor is an ordinary root DS and every outcome
(secure, insecure by NSEC-proven missing DS, bogus, SERVFAIL) is reached by Unbound's own logic, exactly
as in production.  No query leaves loopback: names outside ``test.`` end at our root with NXDOMAIN.

Zones are signed with dnspython at start-up (ECDSA P-256, one combined key per zone, NSEC).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.dnssec
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone
from cryptography.hazmat.primitives.asymmetric import ec
from dns.dnssectypes import Algorithm, DSDigest
from dns.rdtypes.ANY.DNSKEY import DNSKEY

from .hosts import (
    DOMAINS,
    HTTPS_IP,
    LAME_IP,
    LAME_NS_NAME,
    NS_NAME,
    NSD_IP,
    TLD,
    UNBOUND_IP,
    Dnssec,
    Domain,
    domain_mx_hosts,
)
from .pki import Pki

TTL = 300
NEG_TTL = 30
SIG_INCEPTION_BACKDATE = 86400  # tolerate clock skew; validators check inception
SIG_LIFETIME = 30 * 86400


@dataclass(frozen=True)
class DnsFiles:
    """Paths of the DNS part of the bed (``<state>/dns``)."""

    directory: Path

    @property
    def nsd_conf(self) -> Path:
        return self.directory / "nsd.conf"

    @property
    def unbound_conf(self) -> Path:
        return self.directory / "unbound.conf"

    @property
    def anchor(self) -> Path:
        return self.directory / "root.anchor"

    @property
    def lame_conf(self) -> Path:
        return self.directory / "nsd-lame.conf"

    @property
    def resolv_conf(self) -> Path:
        return self.directory / "resolv.conf"


def _zone_file_name(origin: str) -> str:
    return "root.zone" if origin == "." else f"{origin.rstrip('.')}.zone"


def _soa(origin: str) -> str:
    return f"{origin} {TTL} IN SOA {NS_NAME} hostmaster.nic.test. {int(time.time())} 3600 600 86400 {NEG_TTL}"


def _child_lines(d: Domain, pki: Pki) -> list[str]:
    o = d.name
    lines = [_soa(o), f"{o} {TTL} IN NS {NS_NAME}"]
    for pref, key in d.mx:
        lines.append(f"{o} {TTL} IN MX {pref} {next(m.fqdn for m in domain_mx_hosts(d) if m.key == key)}")
    for m in domain_mx_hosts(d):
        lines.append(f"{m.fqdn} {TTL} IN A {m.ip}")
        if d.tlsa:
            digest = "00" * 32 if d.tlsa_mismatch else pki.mx(m.key).spki_sha256
            lines.append(f"_25._tcp.{m.fqdn} {TTL} IN TLSA 3 1 1 {digest}")
    if d.sts is not None:
        for txt in d.sts.txt:
            lines.append(f'_mta-sts.{o} {TTL} IN TXT "{txt}"')
        lines.append(f"mta-sts.{o} {TTL} IN A {HTTPS_IP}")
    lines.extend(f"{line}" for line in d.extra)
    return lines


class _Signer:
    """One key per zone (flags 257: a combined signing key keeps the chain simple)."""

    def __init__(self) -> None:
        self.now = int(time.time())

    def sign(self, zone: dns.zone.Zone) -> DNSKEY:
        key = ec.generate_private_key(ec.SECP256R1())
        dnskey = dns.dnssec.make_dnskey(key.public_key(), Algorithm.ECDSAP256SHA256, flags=257)
        dns.dnssec.sign_zone(
            zone,
            keys=[(key, dnskey)],
            inception=self.now - SIG_INCEPTION_BACKDATE,
            expiration=self.now + SIG_LIFETIME,
        )
        return dnskey


def _parse(origin: str, lines: list[str]) -> dns.zone.Zone:
    return dns.zone.from_text("\n".join(lines) + "\n", origin=origin, relativize=False, check_origin=True)


def _break_signatures(zone: dns.zone.Zone) -> None:
    """Flip a bit in every RRSIG so the zone is bogus while its DS still points at a real key."""
    with zone.writer() as txn:
        for name, rdataset in list(txn.iterate_rdatasets()):
            if rdataset.rdtype != dns.rdatatype.RRSIG:
                continue
            broken = []
            for rr in rdataset:
                sig = bytearray(rr.signature)
                sig[len(sig) // 2] ^= 0x01
                broken.append(rr.replace(signature=bytes(sig)))
            txn.delete(name, dns.rdatatype.RRSIG, rdataset.covers)
            txn.add(name, rdataset.ttl, *broken)


def build_zones(files: DnsFiles, pki: Pki) -> list[str]:
    """Write signed zone files and the root trust anchor; return the zone origins in load order."""
    files.directory.mkdir(parents=True, exist_ok=True)
    signer = _Signer()
    tld_lines = [
        _soa(TLD),
        f"{TLD} {TTL} IN NS {NS_NAME}",
        f"{NS_NAME} {TTL} IN A {NSD_IP}",
        f"{LAME_NS_NAME} {TTL} IN A {LAME_IP}",
    ]
    origins = []
    for d in DOMAINS:
        tld_lines.append(f"{d.name} {TTL} IN NS {LAME_NS_NAME if d.dnssec is Dnssec.SERVFAIL else NS_NAME}")
        if d.dnssec is Dnssec.SERVFAIL:
            continue
        zone = _parse(d.name, _child_lines(d, pki))
        if d.dnssec in (Dnssec.SECURE, Dnssec.BOGUS):
            dnskey = signer.sign(zone)
            ds = dns.dnssec.make_ds(d.name, dnskey, DSDigest.SHA256)
            tld_lines.append(f"{d.name} {TTL} IN DS {ds.to_text()}")
            if d.dnssec is Dnssec.BOGUS:
                _break_signatures(zone)
        zone.to_file(str(files.directory / _zone_file_name(d.name)), relativize=False, want_origin=True)
        origins.append(d.name)
    tld = _parse(TLD, tld_lines)
    tld_key = signer.sign(tld)
    tld.to_file(str(files.directory / _zone_file_name(TLD)), relativize=False, want_origin=True)
    tld_ds = dns.dnssec.make_ds(TLD, tld_key, DSDigest.SHA256)
    root = _parse(
        ".",
        [
            _soa("."),
            f". {TTL} IN NS {NS_NAME}",
            f"{TLD} {TTL} IN NS {NS_NAME}",
            f"{TLD} {TTL} IN DS {tld_ds.to_text()}",
            f"{NS_NAME} {TTL} IN A {NSD_IP}",
        ],
    )
    root_key = signer.sign(root)
    root.to_file(str(files.directory / "root.zone"), relativize=False, want_origin=True)
    root_ds = dns.dnssec.make_ds(".", root_key, DSDigest.SHA256)
    files.anchor.write_text(f". IN DS {root_ds.to_text()}\n")
    files.resolv_conf.write_text(f"nameserver {UNBOUND_IP}\noptions trust-ad timeout:3 attempts:2\n")
    return [".", TLD, *origins]


def write_configs(files: DnsFiles, origins: list[str]) -> None:
    d = files.directory
    zones = "".join(f'zone:\n    name: "{o}"\n    zonefile: "{d / _zone_file_name(o)}"\n' for o in origins)
    files.nsd_conf.write_text(
        f"""server:
    ip-address: {NSD_IP}
    port: 53
    do-ip6: no
    username: ""
    chroot: ""
    database: ""
    zonesdir: "{d}"
    zonelistfile: "{d}/nsd-zone.list"
    xfrdfile: "{d}/nsd-xfrd.state"
    xfrdir: "{d}"
    pidfile: "{d}/nsd.pid"
    logfile: "{d}/nsd.log"
    server-count: 1
    verbosity: 1
    hide-version: yes
    refuse-any: yes
remote-control:
    control-enable: no
{zones}"""
    )
    files.lame_conf.write_text(
        f"""server:
    ip-address: {LAME_IP}
    port: 53
    do-ip6: no
    username: ""
    chroot: ""
    database: ""
    zonelistfile: "{d}/lame-zone.list"
    xfrdfile: "{d}/lame-xfrd.state"
    xfrdir: "{d}"
    pidfile: "{d}/nsd-lame.pid"
    logfile: "{d}/nsd-lame.log"
    server-count: 1
    verbosity: 1
remote-control:
    control-enable: no
"""
    )
    files.unbound_conf.write_text(
        f"""server:
    interface: {UNBOUND_IP}
    port: 53
    do-ip6: no
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: "{d}/unbound.pid"
    logfile: "{d}/unbound.log"
    use-syslog: no
    verbosity: 1
    val-log-level: 2
    log-servfail: yes
    num-threads: 1
    so-reuseport: no
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    module-config: "validator iterator"
    trust-anchor-file: "{files.anchor}"
    local-zone: "test." nodefault
    qname-minimisation: no
    aggressive-nsec: no
    harden-dnssec-stripped: yes
    prefetch: no
    serve-expired: no
    cache-max-ttl: 60
    cache-max-negative-ttl: 10
    infra-host-ttl: 10
    val-bogus-ttl: 5
    ede: yes
    minimal-responses: yes
remote-control:
    control-enable: yes
    control-interface: "{d}/unbound.ctl"
    control-use-cert: no
stub-zone:
    name: "."
    stub-addr: {NSD_IP}
"""
    )


def query(name: str, rdtype: str, server: str = UNBOUND_IP, timeout: float = 8.0) -> dns.message.Message:
    """One query with DO set, as a validating stub (like Postfix with ``smtp_dns_support_level=dnssec``)."""
    q = dns.message.make_query(name, rdtype, want_dnssec=True)
    q.flags |= dns.flags.AD
    return dns.query.udp(q, server, port=53, timeout=timeout)


def wait_ready(deadline_s: float = 15.0) -> None:
    """Wait until NSD answers and Unbound validates the root (a proof that the whole chain is loaded)."""
    end = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            r = query("dane.test.", "MX", timeout=1.0)
            if r.rcode() == 0 and r.flags & dns.flags.AD:
                return
            last = RuntimeError(f"unexpected answer: rcode={r.rcode()} flags={dns.flags.to_text(r.flags)}")
        except Exception as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"DNS not ready after {deadline_s}s: {last}")


@dataclass(frozen=True)
class Resolver:
    """Run-time control of the validating resolver: the SERVFAIL toggle and cache flushes."""

    files: DnsFiles

    def control(self, *args: str) -> str:
        r = subprocess.run(
            ["unbound-control", "-c", str(self.files.unbound_conf), *args],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if r.returncode != 0:
            raise RuntimeError(f"unbound-control {' '.join(args)}: {r.stdout}{r.stderr}")
        return r.stdout

    def flush(self, zone: str | None = None) -> None:
        """Forget cached answers (all, or one zone), bogus results and server health."""
        if zone:
            self.control("flush_zone", zone)
        else:
            self.control("flush_zone", ".")
        self.control("flush_bogus")
        self.control("flush_negative")
        self.control("flush_infra", "all")
        self.control("flush_requestlist")

    def set_servfail(self, zone: str, on: bool) -> None:
        """Re-delegate ``zone`` (in the resolver) to the lame server, or back to the real one.

        From the client's side this is exactly a zone whose servers stopped serving it: SERVFAIL,
        with nothing cached.  Works for any zone of the bed, signed or not.
        """
        zone = zone.rstrip(".") + "."
        if on:
            self.control("stub_add", zone, LAME_IP)
        else:
            with contextlib.suppress(RuntimeError):
                self.control("stub_remove", zone)
        self.flush(zone)

    @contextlib.contextmanager
    def servfail(self, zone: str) -> Iterator[None]:
        """``with bed.dns.servfail("toggle.test"): ...`` - SERVFAIL inside the block, normal after."""
        self.set_servfail(zone, True)
        try:
            yield
        finally:
            self.set_servfail(zone, False)
