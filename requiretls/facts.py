"""Destination facts: what DNS, MTA-STS and SMTP sessions showed about a mail domain, as frozen values.

I/O-free and import-light (no dnspython, ssl, sqlite3, asyncio): :mod:`requiretls.dest` gathers these facts,
:mod:`requiretls.policy` judges them (RFC 8689 section 4.2.1 eligibility, socketmap answers), and neither
imports the other.  Nothing here decides; the properties only restate what the facts say.
"""

from __future__ import annotations

import binascii
import enum
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

# --- DNSSEC -----------------------------------------------------------------------------------------------


class DnssecState(enum.Enum):
    """RFC 4035 section 4.3 security status of one answer, as RFC 7672 section 2.1.1 uses it."""

    SECURE = "secure"
    INSECURE = "insecure"
    BOGUS = "bogus"
    INDETERMINATE = "indeterminate"

    @property
    def trustworthy(self) -> bool:
        """True when the answer may be used at all (secure or insecure); bogus and
        indeterminate answers mean "defer" (RFC 7672 section 2.1.2)."""
        return self in (DnssecState.SECURE, DnssecState.INSECURE)



# --- DANE TLSA records ------------------------------------------------------------------------------------


class Usage(enum.IntEnum):
    """TLSA certificate usage (RFC 6698 section 2.1.1, RFC 7218 acronyms)."""

    PKIX_TA = 0
    PKIX_EE = 1
    DANE_TA = 2
    DANE_EE = 3


class Selector(enum.IntEnum):
    CERT = 0
    SPKI = 1


class MatchingType(enum.IntEnum):
    FULL = 0
    SHA2_256 = 1
    SHA2_512 = 2


@dataclass(frozen=True)
class TlsaRecord:
    """One TLSA record (RFC 6698 section 2.1)."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @classmethod
    def from_text(cls, text: str) -> TlsaRecord:
        """Parse the presentation form ``"3 1 1 ABCD..."``."""
        parts = text.split()
        if len(parts) < 4:
            raise ValueError(f"malformed TLSA record {text!r}")
        try:
            return cls(int(parts[0]), int(parts[1]), int(parts[2]), binascii.unhexlify("".join(parts[3:])))
        except (ValueError, binascii.Error) as e:
            raise ValueError(f"malformed TLSA record {text!r}: {e}") from e

    def to_text(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    @property
    def usable(self) -> bool:
        """RFC 7672 section 3.1: only DANE-TA(2) and DANE-EE(3) are used for SMTP; we treat
        PKIX-TA(0)/PKIX-EE(1) as unusable (section 3.1.3 allows it), and unknown
        selectors or matching types, or a digest of the wrong length, as unusable."""
        if self.usage not in (Usage.DANE_TA, Usage.DANE_EE):
            return False
        if self.selector not in (Selector.CERT, Selector.SPKI):
            return False
        if self.mtype == MatchingType.SHA2_256:
            return len(self.data) == 32
        if self.mtype == MatchingType.SHA2_512:
            return len(self.data) == 64
        return self.mtype == MatchingType.FULL and len(self.data) > 0


def usable_records(records: Iterable[TlsaRecord]) -> tuple[TlsaRecord, ...]:
    """The usable records, with digest agility applied (RFC 7671 section 9).

    For each (usage, selector), only the strongest digest algorithm present is
    used, so a published SHA2-512 record retires the SHA2-256 ones.  Exact-match
    records (matching type 0) are always kept.
    """
    recs = [r for r in records if r.usable]
    best: dict[tuple[int, int], int] = {}
    for r in recs:
        if r.mtype != MatchingType.FULL:
            key = (r.usage, r.selector)
            best[key] = max(best.get(key, 0), r.mtype)
    return tuple(r for r in recs if r.mtype == MatchingType.FULL or r.mtype == best[(r.usage, r.selector)])


def name_matches(pattern: str, name: str) -> bool:
    """RFC 7672 section 3.2.3 / RFC 6125: exact match, or ``*`` as the whole left-most label
    matching exactly one label."""
    pattern = pattern.lower().rstrip(".")
    name = name.lower().rstrip(".")
    if not pattern or not name:
        return False
    if pattern.startswith("*."):
        rest = pattern[2:]
        if "*" in rest or "." not in rest:
            return False
        head, _, tail = name.partition(".")
        return bool(head) and tail == rest
    if "*" in pattern:
        return False
    return pattern == name



# --- MTA-STS --------------------------------------------------------------------------------------------


class StsMode(enum.Enum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """An RFC 8461 section 3.2 policy, with the TXT ``id`` it was fetched under and the
    wall-clock time of the fetch."""

    mode: StsMode
    max_age: int
    mx: tuple[str, ...]
    policy_id: str = ""
    fetched_at: float = 0.0

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.max_age

    def matches(self, mx_host: str) -> bool:
        """RFC 8461 section 4.1: does any ``mx`` pattern match this MX host name?"""
        return any(name_matches(p, mx_host) for p in self.mx)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "max_age": self.max_age, "mx": list(self.mx),
                "id": self.policy_id, "fetched_at": self.fetched_at}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StsPolicy:
        return cls(StsMode(d["mode"]), int(d["max_age"]), tuple(str(x) for x in d["mx"]),
                   str(d["id"]), float(d["fetched_at"]))


class StsStatus(enum.Enum):
    """How :meth:`StsResolver.resolve` reached its answer."""

    NO_RECORD = "no-record"  # no (valid) TXT record and nothing cached
    RECORD_INVALID = "record-invalid"  # TXT records present but none/two valid, nothing cached
    RECORD_LOOKUP_FAILED = "record-lookup-failed"  # DNS error on the TXT, nothing cached
    FETCHED = "fetched"  # fresh policy fetched now
    CACHED = "cached"  # cached policy, TXT id unchanged
    CACHED_NO_RECORD = "cached-no-record"  # TXT gone/invalid/failed; cached policy still valid
    CACHED_FETCH_FAILED = "cached-fetch-failed"  # new id, fetch failed, cached policy applied
    FETCH_FAILED = "fetch-failed"  # valid TXT, fetch failed, nothing cached: no policy


@dataclass(frozen=True)
class StsResult:
    """MTA-STS state of a domain; ``policy`` is what senders apply (``None``: no policy)."""

    domain: str
    status: StsStatus
    policy: StsPolicy | None
    record_id: str | None = None
    detail: str = ""

    @property
    def mode(self) -> StsMode | None:
        return self.policy.mode if self.policy else None

    @property
    def unknown(self) -> bool:
        """No policy is known, and not because the domain has none: the TXT lookup failed, or a valid record
        names a policy that could not be fetched and nothing is cached (RFC 8461 section 3.3).  An ordinary
        message is then sent as if there were no policy; a REQUIRETLS message has nothing to validate its MX
        with and defers (doubt defers)."""
        return self.policy is None and self.status in (StsStatus.FETCH_FAILED, StsStatus.RECORD_LOOKUP_FAILED)


# --- MX hosts and the destination -------------------------------------------------------------------------


class MxSource(enum.Enum):
    MX = "mx"  # MX records
    IMPLICIT = "implicit"  # no MX: the domain's own A/AAAA (RFC 5321 section 5.1)
    NULL_MX = "null-mx"  # RFC 7505: the domain accepts no mail
    NXDOMAIN = "nxdomain"  # the domain does not exist
    ERROR = "error"  # bogus or indeterminate MX lookup: defer


class DaneState(enum.Enum):
    """Per-MX DANE state (RFC 7672 section 2.2)."""

    USABLE = "usable"  # secure TLSA RRset with >= 1 usable record: TLS and authentication MUST
    UNUSABLE = "unusable"  # secure TLSA RRset, every record unusable: TLS MUST, no authentication
    NONE = "none"  # secure denial of TLSA: pre-DANE opportunistic TLS
    INSECURE = "insecure"  # TLSA answer insecure: pre-DANE opportunistic TLS
    NOT_APPLICABLE = "not-applicable"  # MX or address insecure: TLSA not looked up (section 2.2.1/2.2.2)
    FAILED = "failed"  # TLSA lookup failed: MX MUST NOT be used (section 2.1.2)


class TlsRequirement(enum.Enum):
    """What TLS policy the destination demands of an ordinary message."""

    DANE = "dane"  # DNSSEC MX and TLSA: per-MX DANE (Postfix level 'dane')
    STS_ENFORCE = "sts-enforce"  # MTA-STS enforce: verified TLS to an MX matching the patterns
    STS_TESTING = "sts-testing"  # MTA-STS testing: opportunistic, report failures
    OPPORTUNISTIC = "opportunistic"  # nothing published: opportunistic TLS
    DEFER = "defer"  # DNS trouble: the answer is unknown, try later
    NO_MAIL = "no-mail"  # null MX or nonexistent domain


@dataclass(frozen=True)
class MxHost:
    """One delivery candidate, in RFC 5321 preference order."""

    name: str
    preference: int
    mx_secure: bool  # reached through a DNSSEC-secure MX (or secure implicit-MX) lookup
    addresses: tuple[str, ...] = ()
    address_state: DnssecState = DnssecState.INDETERMINATE
    tlsa_base: str | None = None
    tlsa: tuple[TlsaRecord, ...] = ()
    tlsa_state: DnssecState | None = None
    dane: DaneState = DaneState.NOT_APPLICABLE
    sts_match: bool = False
    problem: str = ""  # why the host cannot be used; '' when it can

    @property
    def usable(self) -> bool:
        return not self.problem

    @property
    def usable_tlsa(self) -> tuple[TlsaRecord, ...]:
        return usable_records(self.tlsa) if self.dane is DaneState.USABLE else ()

    @property
    def dns_trouble(self) -> bool:
        """Unusable because a lookup failed (address or TLSA answer bogus/indeterminate): may clear up, so a
        sender defers instead of bouncing (RFC 7672 section 2.1.2)."""
        return self.dane is DaneState.FAILED or (not self.addresses and not self.address_state.trustworthy)

    @property
    def tls_required(self) -> bool:
        """RFC 7672 section 2.2.3: any secure TLSA RRset, even unusable, forbids cleartext."""
        return self.dane in (DaneState.USABLE, DaneState.UNUSABLE)

    @property
    def auth_method(self) -> str:
        """How a REQUIRETLS client authenticates this host: ``dane`` or ``pkix``."""
        return "dane" if self.dane is DaneState.USABLE else "pkix"

    def dane_reference_names(self, domain: str, canonical_domain: str | None = None) -> tuple[str, ...]:
        """RFC 7672 section 3.2.2 reference identifiers for DANE-TA: the TLSA base domain,
        then, for a secure MX, the next-hop domain and its CNAME expansion."""
        names: list[str] = [self.tlsa_base or self.name]
        if self.mx_secure:
            names.append(domain)
            if canonical_domain and canonical_domain != domain:
                names.append(canonical_domain)
        return tuple(dict.fromkeys(names))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "preference": self.preference,
            "mx_secure": self.mx_secure,
            "addresses": list(self.addresses),
            "address_dnssec": self.address_state.value,
            "tlsa_base": self.tlsa_base,
            "tlsa_dnssec": self.tlsa_state.value if self.tlsa_state else None,
            "tlsa": [{"record": r.to_text(), "usable": r.usable} for r in self.tlsa],
            "dane": self.dane.value,
            "sts_match": self.sts_match,
            "usable": self.usable,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class Destination:
    """Everything :mod:`requiretls.dest` knows about a domain, at one moment."""

    domain: str
    source: MxSource
    mx_state: DnssecState
    hosts: tuple[MxHost, ...]
    sts: StsResult | None
    requirement: TlsRequirement
    reason: str
    ttl: int
    sts_error: str = ""
    canonical: str | None = None  # CNAME expansion of the domain for implicit MX

    @property
    def mx_secure(self) -> bool:
        return self.mx_state is DnssecState.SECURE and self.source in (MxSource.MX, MxSource.IMPLICIT)

    @property
    def sts_unknown(self) -> bool:
        """The MTA-STS state could not be learnt (fetch or lookup failure, unreadable cache)."""
        return bool(self.sts_error) or (self.sts is not None and self.sts.unknown)

    def to_dict(self) -> dict[str, Any]:
        sts: dict[str, Any] | None = None
        if self.sts is not None:
            sts = {
                "status": self.sts.status.value,
                "record_id": self.sts.record_id,
                "detail": self.sts.detail,
                "policy": self.sts.policy.to_dict() if self.sts.policy else None,
            }
        return {
            "domain": self.domain,
            "source": self.source.value,
            "mx_dnssec": self.mx_state.value,
            "hosts": [h.to_dict() for h in self.hosts],
            "mta_sts": sts,
            "mta_sts_error": self.sts_error,
            "requirement": self.requirement.value,
            "reason": self.reason,
            "ttl": self.ttl,
        }




# --- one SMTP TLS session with one MX address ----------------------------------------------------------------


class SessionStage(enum.Enum):
    """How far an SMTP TLS session got before it ended (RFC 8689 section 4.2.1 steps 3-5)."""

    CONNECT = "connect"  # no TCP connection or no 220 greeting
    EHLO = "ehlo"  # EHLO refused before STARTTLS
    STARTTLS = "starttls"  # STARTTLS not offered or refused
    HANDSHAKE = "handshake"  # TLS handshake or PKIX verification failed
    AUTHENTICATE = "authenticate"  # handshake done, DANE match failed
    EHLO_TLS = "ehlo-tls"  # EHLO after TLS refused or REQUIRETLS absent
    DONE = "done"  # authenticated TLS and the post-TLS EHLO answered


@dataclass(frozen=True)
class SessionResult:
    """What one SMTP session with one MX address showed: connect, EHLO, STARTTLS, DANE or PKIX, EHLO again.

    ``transient`` says the session ended for a reason that may clear up by itself (connection refused or
    lost, timeout, a 4xx greeting): the MX proved nothing about its TLS.  ``authenticated`` is True only
    after a verified handshake (PKIX chain and name, or a DANE TLSA match).
    """

    host: str
    address: str = ""
    port: int = 25
    stage: SessionStage = SessionStage.CONNECT
    transient: bool = False
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
        """STARTTLS done and the certificate authenticated."""
        return self.starttls and self.verified

    @property
    def where(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}" if self.address else self.host

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stage"] = self.stage.value
        d["extensions"] = list(self.extensions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SessionResult:
        d = dict(d)
        d["stage"] = SessionStage(d.get("stage", SessionStage.CONNECT.value))
        d["extensions"] = tuple(d.get("extensions", ()))
        return cls(**d)
