"""What a destination domain offers: MX hosts with their DNSSEC and DANE state, its
MTA-STS policy, and the TLS policy that follows (RFC 7672 section 2.2, RFC 8461,
RFC 8689 section 4.2.1).

DANE is preferred over MTA-STS when the MX RRset is DNSSEC-signed and TLSA
records exist; MTA-STS never overrides a DANE failure (RFC 8461 section 2).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .cache import SingleFlight
from .dane import TlsaRecord, usable_records
from .dnssec import DnsAnswer, DnsClient, DnssecState, LookupStatus, normalize_name
from .errors import DnsLookupError, MtaStsTemporaryError
from .mtasts import StsMode, StsResolver, StsResult

if TYPE_CHECKING:
    from .probe import ProbeResult

log = logging.getLogger("requiretls.dest")


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

    def mx_validated(self, host: MxHost) -> bool:
        """RFC 8689 section 4.2.1 step 2: the MX name is authenticated by DNSSEC or by an
        MTA-STS policy (enforce or testing) listing it."""
        return host.mx_secure or (self.sts is not None and self.sts.mx_validated(host.name))

    def requiretls_candidates(self) -> tuple[MxHost, ...]:
        """Hosts a REQUIRETLS message may be offered to, in preference order (without probing)."""
        if self.requirement in (TlsRequirement.DEFER, TlsRequirement.NO_MAIL):
            return ()
        return tuple(h for h in self.hosts if h.usable and self.mx_validated(h))

    def raise_if_deferred(self) -> None:
        if self.requirement is TlsRequirement.DEFER:
            raise DnsLookupError(f"{self.domain}: {self.reason}")

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


@dataclass(frozen=True)
class DestSettings:
    """Settings of :class:`DestinationResolver` not covered by the DNS/STS settings."""

    smtp_port: int = 25  # TLSA owner is _PORT._tcp.HOST (RFC 7672 section 2.2.3)
    use_mta_sts: bool = True


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


@dataclass
class DestinationResolver:
    """Builds :class:`Destination` objects; concurrent lookups of a domain are coalesced."""

    dns: DnsClient
    sts: StsResolver | None = None
    settings: DestSettings = field(default_factory=DestSettings)
    _flight: SingleFlight[Destination] = field(default_factory=SingleFlight, repr=False)

    async def lookup(self, domain: str) -> Destination:
        domain = normalize_name(domain)
        if _is_ip_literal(domain):
            raise ValueError(f"{domain} is an address literal; no MX, DANE or MTA-STS apply")
        return await self._flight.run(domain, lambda: self._lookup(domain))

    async def nexthop(self, host: str, port: int | None = None) -> Destination:
        """A next hop configured by the admin (Postfix's ``relayhost = [host]:port``), not found through MX
        records: its name needs no DNSSEC or MTA-STS validation (RFC 8689 section 4.2.1 step 2 is about MX
        lookups), only authenticated TLS: DANE when its addresses and TLSA are DNSSEC-secure, else PKIX.
        The TLSA records are those of the port the next hop is reached on, ``_PORT._tcp.host``
        (RFC 7672 section 2.2.3; RFC 6698 section 3), 25 unless ``port`` says otherwise."""
        name = normalize_name(host)
        h = await self._host(name, name, 0, True, None, port)
        if h.dns_trouble:
            return Destination(name, MxSource.ERROR, h.address_state, (h,), None, TlsRequirement.DEFER,
                               f"next hop {name}: {h.problem}", 0)
        req = TlsRequirement.DANE if h.usable_tlsa else TlsRequirement.OPPORTUNISTIC
        return Destination(name, MxSource.MX, DnssecState.SECURE, (h,), None, req, "configured next hop", 300)

    async def _sts(self, domain: str) -> tuple[StsResult | None, str]:
        if self.sts is None or not self.settings.use_mta_sts:
            return None, ""
        try:
            return await self.sts.resolve(domain), ""
        except MtaStsTemporaryError as e:
            return None, str(e)

    async def _lookup(self, domain: str) -> Destination:
        mx_answer, (sts, sts_error) = await asyncio.gather(self.dns.query(domain, "MX"), self._sts(domain))
        ttls = [mx_answer.ttl]
        if mx_answer.status is LookupStatus.ERROR or not mx_answer.state.trustworthy:
            reason = f"MX lookup {mx_answer.state.value} ({mx_answer.error}): deferring (RFC 7672 section 2.1.2)"
            return Destination(domain, MxSource.ERROR, mx_answer.state, (), sts, TlsRequirement.DEFER,
                               reason, 0, sts_error)
        mx_secure = mx_answer.state is DnssecState.SECURE
        if mx_answer.status is LookupStatus.NXDOMAIN:
            return Destination(domain, MxSource.NXDOMAIN, mx_answer.state, (), sts, TlsRequirement.NO_MAIL,
                               "domain does not exist", mx_answer.ttl, sts_error)
        canonical: str | None = None
        if mx_answer.status is LookupStatus.NODATA:
            source = MxSource.IMPLICIT
            targets = [(0, mx_answer.canonical)]
            canonical = mx_answer.canonical
        else:
            source = MxSource.MX
            parsed: list[tuple[int, str]] = []
            for text in mx_answer.rdata:
                pref_text, _, exchange = text.partition(" ")
                parsed.append((int(pref_text), exchange.strip().rstrip(".").lower()))
            real = [(p, x) for p, x in parsed if x]
            if not real:  # RFC 7505: a single MX with "." as exchange
                return Destination(domain, MxSource.NULL_MX, mx_answer.state, (), sts, TlsRequirement.NO_MAIL,
                                   "null MX: the domain accepts no mail (RFC 7505)", mx_answer.ttl, sts_error)
            targets = sorted(dict.fromkeys(real), key=lambda px: px[0])
        hosts = await asyncio.gather(*(self._host(domain, name, pref, mx_secure, sts) for pref, name in targets))
        requirement, reason = self._requirement(mx_secure, hosts, sts, sts_error)
        ttl = min(ttls)
        return Destination(domain, source, mx_answer.state, tuple(hosts), sts, requirement, reason, ttl,
                           sts_error, canonical)

    async def _host(self, domain: str, name: str, pref: int, mx_secure: bool, sts: StsResult | None,
                    port: int | None = None) -> MxHost:
        sts_match = sts is not None and sts.policy is not None and sts.policy.matches(name)
        if _is_ip_literal(name):
            return MxHost(name, pref, mx_secure, (name,), DnssecState.INSECURE, sts_match=sts_match,
                          problem="MX exchange is an IP address (RFC 7505 / 5321: not a host name)")
        answers = await self.dns.query_many(name, ("A", "AAAA"))
        failed = [a for a in answers if a.status is LookupStatus.ERROR or not a.state.trustworthy]
        if failed:
            detail = "; ".join(f"{a.rdtype} {a.state.value} {a.error}" for a in failed)
            return MxHost(name, pref, mx_secure, (), failed[0].state, sts_match=sts_match,
                          problem=f"address lookup failed: {detail}")
        addresses = tuple(r for a in answers for r in a.rdata)
        addr_state = (DnssecState.SECURE if all(a.state is DnssecState.SECURE for a in answers)
                      else DnssecState.INSECURE)
        if not addresses:
            return MxHost(name, pref, mx_secure, (), addr_state, sts_match=sts_match, problem="no A/AAAA record")
        if not mx_secure or addr_state is not DnssecState.SECURE:
            return MxHost(name, pref, mx_secure, addresses, addr_state, dane=DaneState.NOT_APPLICABLE,
                          sts_match=sts_match)
        # RFC 7672 section 2.2.2: with a secure CNAME chain, try the expanded name first.
        canonicals = [a.canonical for a in answers if a.status is LookupStatus.ANSWER]
        bases = list(dict.fromkeys([*canonicals, name]))
        last: DnsAnswer | None = None
        for base in bases:
            tlsa = await self.dns.query(f"_{port or self.settings.smtp_port}._tcp.{base}", "TLSA")
            last = tlsa
            if tlsa.status is LookupStatus.ERROR or not tlsa.state.trustworthy:
                return MxHost(name, pref, mx_secure, addresses, addr_state, base, (), tlsa.state,
                              DaneState.FAILED, sts_match,
                              f"TLSA lookup {tlsa.state.value} ({tlsa.error}): MX unusable (RFC 7672 section 2.1.2)")
            if tlsa.status is LookupStatus.ANSWER and tlsa.state is DnssecState.SECURE:
                records: list[TlsaRecord] = []
                for text in tlsa.rdata:
                    try:
                        records.append(TlsaRecord.from_text(text))
                    except ValueError:
                        continue  # malformed record: unusable, like an unknown parameter
                state = DaneState.USABLE if usable_records(records) else DaneState.UNUSABLE
                return MxHost(name, pref, mx_secure, addresses, addr_state, base, tuple(records), tlsa.state,
                              state, sts_match)
        assert last is not None
        dane = DaneState.NONE if last.state is DnssecState.SECURE else DaneState.INSECURE
        return MxHost(name, pref, mx_secure, addresses, addr_state, None, (), last.state, dane, sts_match)

    @staticmethod
    def _requirement(mx_secure: bool, hosts: list[MxHost], sts: StsResult | None,
                     sts_error: str) -> tuple[TlsRequirement, str]:
        usable = [h for h in hosts if h.usable]
        if not usable:
            problems = "; ".join(f"{h.name}: {h.problem}" for h in hosts)
            return TlsRequirement.DEFER, f"no usable MX host ({problems})"
        if mx_secure and any(h.dane in (DaneState.USABLE, DaneState.UNUSABLE, DaneState.FAILED) for h in hosts):
            n = sum(1 for h in hosts if h.dane is DaneState.USABLE)
            return TlsRequirement.DANE, f"DNSSEC-signed MX with TLSA records ({n} of {len(hosts)} with usable ones)"
        if sts is not None and sts.policy is not None and sts.policy.mode is StsMode.ENFORCE:
            return TlsRequirement.STS_ENFORCE, f"MTA-STS policy in enforce mode ({sts.status.value})"
        if sts_error:
            return TlsRequirement.DEFER, f"MTA-STS state unknown: {sts_error}"
        if sts is not None and sts.policy is not None and sts.policy.mode is StsMode.TESTING:
            return TlsRequirement.STS_TESTING, "MTA-STS policy in testing mode"
        return TlsRequirement.OPPORTUNISTIC, "no DANE TLSA records and no MTA-STS policy in force"


class VerdictOutcome(enum.Enum):
    POSSIBLE = "possible"
    NOT_POSSIBLE = "not-possible"
    LOOKUP_ERROR = "lookup-error"


@dataclass(frozen=True)
class RequireTlsVerdict:
    """Whether a REQUIRETLS message can be delivered to the domain (RFC 8689 section 4.2.1).

    ``status`` is the enhanced status code a delivery agent would use for the
    failure (5.7.30 / 5.7.10, or 4.4.3 for DNS trouble).  ``probed`` is False when
    the REQUIRETLS advertisement and certificates were not tested.
    """

    outcome: VerdictOutcome
    reason: str
    mx: str | None = None
    status: str = ""
    probed: bool = False

    @property
    def possible(self) -> bool:
        return self.outcome is VerdictOutcome.POSSIBLE


def assess_requiretls(dest: Destination, probes: Mapping[str, ProbeResult] | None = None) -> RequireTlsVerdict:
    """Judge RFC 8689 section 4.2.1 for a destination; ``probes`` maps MX names to probe results.

    Without probes only steps 1-2 (secure MX lookup, MX validation) are judged;
    with probes steps 4-5 too (authenticated TLS, REQUIRETLS after STARTTLS).
    """
    if dest.requirement is TlsRequirement.DEFER:
        return RequireTlsVerdict(VerdictOutcome.LOOKUP_ERROR, dest.reason, status="4.4.3")
    if dest.source is MxSource.NULL_MX:
        return RequireTlsVerdict(VerdictOutcome.NOT_POSSIBLE, "null MX: the domain accepts no mail", status="5.1.10")
    if dest.source is MxSource.NXDOMAIN:
        return RequireTlsVerdict(VerdictOutcome.NOT_POSSIBLE, "the domain does not exist", status="5.1.2")
    candidates = dest.requiretls_candidates()
    if not candidates:
        why = "no MX host is DNSSEC-validated or listed by an MTA-STS policy"
        if dest.sts is not None and dest.sts.policy is not None and dest.sts.policy.mode is StsMode.NONE:
            why += " (MTA-STS mode is none)"
        elif dest.sts is not None and dest.sts.policy is not None:
            why += " (MTA-STS patterns match no usable MX)"
        return RequireTlsVerdict(VerdictOutcome.NOT_POSSIBLE, why, status="5.7.10")
    if probes is None:
        first = candidates[0]
        how = "DNSSEC" if first.mx_secure else "MTA-STS"
        return RequireTlsVerdict(
            VerdictOutcome.POSSIBLE,
            f"{first.name} is {how}-validated ({first.auth_method.upper()} authentication); "
            "certificate and REQUIRETLS support not probed (use --probe)",
            first.name, "", False)
    tls_fail: list[str] = []
    no_requiretls: list[str] = []
    for host in candidates:
        result = probes.get(host.name)
        if result is None:
            continue
        if not result.tls_ok:
            tls_fail.append(f"{host.name}: {result.error or result.verify_error or 'TLS failed'}")
            continue
        if not result.requiretls:
            no_requiretls.append(host.name)
            continue
        how = "DNSSEC" if host.mx_secure else "MTA-STS"
        return RequireTlsVerdict(
            VerdictOutcome.POSSIBLE,
            f"{host.name} is {how}-validated, {result.verification}-verified {result.tls_version}, "
            "advertises REQUIRETLS",
            host.name, "", True)
    if no_requiretls:
        detail = "; ".join([f"{n}: REQUIRETLS not advertised" for n in no_requiretls] + tls_fail)
        return RequireTlsVerdict(VerdictOutcome.NOT_POSSIBLE,
                                 f"no validated MX advertises REQUIRETLS after STARTTLS ({detail})",
                                 status="5.7.30", probed=True)
    detail = "; ".join(tls_fail) or "no probe results"
    return RequireTlsVerdict(VerdictOutcome.NOT_POSSIBLE,
                             f"no validated MX offers authenticated TLS ({detail})", status="5.7.10", probed=True)
