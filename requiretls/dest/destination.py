"""What a destination domain offers: MX hosts with their DNSSEC and DANE state, its
MTA-STS policy, and the TLS policy that follows (RFC 7672 section 2.2, RFC 8461,
RFC 8689 section 4.2.1).

DANE is preferred over MTA-STS when the MX RRset is DNSSEC-signed and TLSA
records exist; MTA-STS never overrides a DANE failure (RFC 8461 section 2).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass, field

from requiretls.addresses import NextHop
from requiretls.facts import (
    DaneState,
    Destination,
    DnssecState,
    MxHost,
    MxSource,
    StsMode,
    StsResult,
    TlsaRecord,
    TlsRequirement,
    usable_records,
)

from .cache import SingleFlight
from .dnssec import DnsAnswer, DnsClient, LookupStatus, normalize_name
from .errors import MtaStsTemporaryError
from .mtasts import StsResolver

log = logging.getLogger("requiretls.dest")


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

    async def resolve(self, hop: NextHop) -> Destination:
        """A Postfix next hop (smtp(8) "SMTP DESTINATION SYNTAX"): ``domain[:port]`` is looked up like
        :meth:`lookup` (MX records with their DNSSEC state, MTA-STS), ``[host][:port]`` is that host alone
        (:meth:`nexthop`: its A/AAAA records, no MX lookup).  Either way the TLSA records are those of the port
        the hop is reached on, ``_PORT._tcp.HOST`` (RFC 7672 section 2.2.3)."""
        if not hop.mx:
            return await self.nexthop(hop.host, hop.port)
        domain = normalize_name(hop.host)
        key = domain if hop.port == self.settings.smtp_port else f"{domain}:{hop.port}"
        return await self._flight.run(key, lambda: self._lookup(domain, hop.port))

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

    async def _lookup(self, domain: str, port: int | None = None) -> Destination:
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
        hosts = await asyncio.gather(*(self._host(domain, name, pref, mx_secure, sts, port)
                                       for pref, name in targets))
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
