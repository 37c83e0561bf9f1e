"""DANE TLSA records and certificate matching for SMTP (RFC 7672, RFC 7671, RFC 6698).

The delivery agent and the probe call :func:`match_tlsa` after a TLS handshake
done *without* PKIX verification; this module decides whether the peer chain is
authenticated by the TLSA RRset.  Only ``cryptography`` APIs present in
version 38 (Debian 12) are required; newer ones are used when available.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from requiretls.facts import MatchingType, Selector, TlsaRecord, Usage, name_matches, usable_records

from .errors import CertificateParseError

if TYPE_CHECKING:
    from cryptography import x509

# cryptography is imported where certificates are handled (the relay agent, ``check``), not at import time:
# it costs policyd and the milter ~8 MB of RSS they never use.


class DaneOutcome(enum.Enum):
    MATCHED_EE = "matched-dane-ee"
    MATCHED_TA = "matched-dane-ta"
    NO_USABLE_RECORDS = "no-usable-records"
    NO_MATCH = "no-match"
    NAME_MISMATCH = "name-mismatch"
    CHAIN_INVALID = "chain-invalid"
    EMPTY_CHAIN = "empty-chain"


@dataclass(frozen=True)
class DaneResult:
    """Result of :func:`match_tlsa`.  ``authenticated`` is the only field a sender may act on."""

    outcome: DaneOutcome
    record: TlsaRecord | None = None
    detail: str = ""

    @property
    def authenticated(self) -> bool:
        return self.outcome in (DaneOutcome.MATCHED_EE, DaneOutcome.MATCHED_TA)


def _load(der: bytes) -> x509.Certificate:
    from cryptography import x509

    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise CertificateParseError(f"cannot decode certificate: {e}") from e


def _spki(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    return der if selector == Selector.CERT else _spki(cert)


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == MatchingType.SHA2_256:
        return hashlib.sha256(data).digest()
    if mtype == MatchingType.SHA2_512:
        return hashlib.sha512(data).digest()
    return data


def record_matches(record: TlsaRecord, der: bytes) -> bool:
    """Whether one certificate (DER) matches one TLSA record's selector and matching type."""
    cert = _load(der)
    return _digest(_selected(cert, der, record.selector), record.mtype) == record.data


def make_tlsa(der: bytes, usage: int = 3, selector: int = 1, mtype: int = 1) -> TlsaRecord:
    """Build the TLSA record that a certificate would match (for tests and ``check`` output)."""
    cert = _load(der)
    return TlsaRecord(usage, selector, mtype, _digest(_selected(cert, der, selector), mtype))


def _utc(dt: datetime.datetime) -> datetime.datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=datetime.UTC)


def _not_before(cert: x509.Certificate) -> datetime.datetime:
    return _utc(getattr(cert, "not_valid_before_utc", None) or cert.not_valid_before)


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    return _utc(getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after)


def _verify_signature(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s key signed ``cert``."""
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa

    if cert.issuer != issuer.subject:
        return False
    direct = getattr(cert, "verify_directly_issued_by", None)
    if direct is not None:  # cryptography >= 40
        try:
            direct(issuer)
            return True
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return False
    key = issuer.public_key()
    algo = cert.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if algo is None:
                return False
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algo)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if algo is None:
                return False
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algo))
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        elif isinstance(key, dsa.DSAPublicKey):
            if algo is None:
                return False
            key.verify(cert.signature, cert.tbs_certificate_bytes, algo)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    from cryptography import x509

    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bool(bc.ca)


def _valid_at(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return _not_before(cert) <= now <= _not_after(cert)


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """Reference-identifier candidates of a certificate: its DNS-IDs, or the CN-ID when the
    certificate has no DNS-ID (RFC 7672 section 3.2.3)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_ids = tuple(str(n).lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        dns_ids = ()
    if dns_ids:
        return dns_ids
    return tuple(str(a.value).lower().rstrip(".") for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))


def match_tlsa(
    records: Sequence[TlsaRecord],
    chain: Sequence[bytes],
    reference_names: Sequence[str],
    now: datetime.datetime | None = None,
) -> DaneResult:
    """Authenticate a peer chain with a TLSA RRset (RFC 7672 section 3).

    ``chain`` is the DER chain as the server sent it, leaf first.
    ``reference_names`` are the names a DANE-TA(2) leaf must match, in the order
    of RFC 7672 section 3.2.2: the TLSA base domain, then (for a secure MX) the
    next-hop domain and its CNAME expansion.

    * DANE-EE(3) matches the leaf only; names and expiry are not checked
      (section 3.1.1 and 3.2.1).
    * DANE-TA(2) matches a certificate of the chain the server sent (the TA must
      be in it, section 3.1.2); the leaf must chain to it by issuer name and
      signature through CA certificates that are all within their validity
      period, and the leaf must carry one of the reference names.
    """
    usable = usable_records(records)
    if not usable:
        return DaneResult(DaneOutcome.NO_USABLE_RECORDS)
    if not chain:
        return DaneResult(DaneOutcome.EMPTY_CHAIN)
    certs = [_load(der) for der in chain]
    leaf_der, leaf = chain[0], certs[0]
    for rec in usable:
        if rec.usage == Usage.DANE_EE and _digest(_selected(leaf, leaf_der, rec.selector), rec.mtype) == rec.data:
            return DaneResult(DaneOutcome.MATCHED_EE, rec)
    now = now or datetime.datetime.now(datetime.UTC)
    ta_records = [r for r in usable if r.usage == Usage.DANE_TA]
    outcome = DaneResult(DaneOutcome.NO_MATCH, None, "no TLSA record matches the chain")
    for rec in ta_records:
        for idx, (der, cert) in enumerate(zip(chain, certs, strict=True)):
            if _digest(_selected(cert, der, rec.selector), rec.mtype) != rec.data:
                continue
            problem = _check_path(certs[: idx + 1], now)
            if problem:
                outcome = DaneResult(DaneOutcome.CHAIN_INVALID, rec, problem)
                continue
            names = certificate_names(leaf)
            if not any(name_matches(p, ref) for p in names for ref in reference_names):
                outcome = DaneResult(DaneOutcome.NAME_MISMATCH, rec,
                                     f"certificate names {list(names)} match none of {list(reference_names)}")
                continue
            return DaneResult(DaneOutcome.MATCHED_TA, rec)
    return outcome


def _check_path(path: Sequence[x509.Certificate], now: datetime.datetime) -> str:
    """Check that ``path`` (leaf .. trust anchor) is a signed chain; '' when it is."""
    for cert in path:
        if not _valid_at(cert, now):
            return f"certificate {cert.subject.rfc4514_string()} is outside its validity period"
    for child, issuer in itertools.pairwise(path):
        if not _is_ca(issuer):
            return f"issuer {issuer.subject.rfc4514_string()} is not a CA certificate"
        if not _verify_signature(child, issuer):
            return f"{child.subject.rfc4514_string()} is not signed by {issuer.subject.rfc4514_string()}"
    return ""


def leaf_summary(der: bytes) -> dict[str, str]:
    """Subject, issuer, names and validity of a certificate, for ``requiretls check``."""
    cert = _load(der)
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "names": ",".join(certificate_names(cert)),
        "not_after": _not_after(cert).isoformat(),
        "sha256": hashlib.sha256(der).hexdigest(),
        "spki_sha256": hashlib.sha256(_spki(cert)).hexdigest(),
    }


__all__ = [
    "DaneOutcome",
    "DaneResult",
    "MatchingType",
    "Selector",
    "TlsaRecord",
    "Usage",
    "certificate_names",
    "make_tlsa",
    "match_tlsa",
    "name_matches",
    "record_matches",
    "usable_records",
]
