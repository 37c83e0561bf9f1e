"""The testbed's test CA and certificates, made with ``cryptography`` at bed start-up.

EC P-256 keys keep generation to milliseconds, so every ``up`` makes a fresh CA and nothing stale or
expired survives between runs.  The TLSA 3 1 1 digest of each MX comes from the same key that MX serves.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .hosts import DOMAINS, MX_HOSTS, Cert, StsHttp

POSTFIX_HOSTNAME = "postfix.local.test"


@dataclass(frozen=True)
class CertFiles:
    """Paths of one issued certificate; ``spki_sha256`` is the TLSA 3 1 1 association data."""

    name: str
    cert: Path
    key: Path
    spki_sha256: str


@dataclass(frozen=True)
class Pki:
    """Where the CA and all leaf certificates live (``<state>/pki``)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    def files(self, name: str) -> CertFiles:
        spki = (self.directory / f"{name}.spki").read_text().strip()
        return CertFiles(name, self.directory / f"{name}.pem", self.directory / f"{name}.key", spki)

    def mx(self, key: str) -> CertFiles:
        return self.files(f"mx-{key}")

    def sts(self, domain: str) -> CertFiles:
        return self.files(f"mta-sts.{domain}")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def spki_sha256(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


class _Issuer:
    def __init__(self, directory: Path, now: dt.datetime) -> None:
        self.directory = directory
        self.now = now
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_name = _name("requiretls testbed CA")
        ca = (
            x509.CertificateBuilder()
            .subject_name(self.ca_name)
            .issuer_name(self.ca_name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key()), False)
            .sign(self.ca_key, hashes.SHA256())
        )
        (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        _write_key(directory / "ca.key", self.ca_key)

    def issue(self, name: str, dns_names: list[str], kind: Cert = Cert.GOOD) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        if kind is Cert.WRONG_NAME:
            dns_names = ["wrong-name.invalid.test"]
        not_before, not_after = self.now - dt.timedelta(days=1), self.now + dt.timedelta(days=90)
        if kind is Cert.EXPIRED:
            not_before, not_after = self.now - dt.timedelta(days=60), self.now - dt.timedelta(days=2)
        subject = _name(dns_names[0])
        issuer, signer = self.ca_name, self.ca_key
        if kind is Cert.SELF_SIGNED:
            issuer, signer = subject, key
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                False,
            )
        )
        if kind is not Cert.SELF_SIGNED:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), False
            )
        cert = builder.sign(signer, hashes.SHA256())
        (self.directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(self.directory / f"{name}.key", key)
        (self.directory / f"{name}.spki").write_text(spki_sha256(key) + "\n")


def make_pki(directory: Path) -> Pki:
    """Create the CA and every certificate the bed's servers present."""
    directory.mkdir(parents=True, exist_ok=True)
    issuer = _Issuer(directory, dt.datetime.now(dt.UTC))
    for m in MX_HOSTS:
        issuer.issue(f"mx-{m.key}", [m.hostname], m.cert)
    for d in DOMAINS:
        if d.sts is not None:
            kind = Cert.SELF_SIGNED if d.sts.http is StsHttp.BAD_CERT else Cert.GOOD
            issuer.issue(f"mta-sts.{d.domain}", [f"mta-sts.{d.domain}"], kind)
    issuer.issue("postfix", [POSTFIX_HOSTNAME, "localhost"])
    return Pki(directory)
