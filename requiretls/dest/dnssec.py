"""DNSSEC-aware DNS lookups against a trusted validating resolver.

RFC 7672 section 2.1.1: a DANE client needs a security-aware resolver and must
tell four outcomes apart.  We do not validate signatures ourselves; we trust the
AD bit of a *validating* resolver reached over a trusted path (loopback), and we
read its SERVFAIL (plus the RFC 8914 Extended DNS Error, when it sends one) as a
validation failure:

* ``SECURE``: NOERROR/NXDOMAIN with AD set (a secure answer or authenticated denial);
* ``INSECURE``: NOERROR/NXDOMAIN without AD (unsigned zone, or an insecure delegation);
* ``BOGUS``: SERVFAIL with an EDE code that names a DNSSEC failure;
* ``INDETERMINATE``: any other SERVFAIL, REFUSED, timeout or malformed reply.
  RFC 7672 section 2.1.1 says to treat it as bogus: both defer.

We use :mod:`dns.asyncquery` (not :mod:`dns.asyncresolver`) on purpose: the
stub resolver retries a SERVFAIL on other servers and hides the flags of the
reply we need, and it caches on its own; here every reply is seen as sent.
Only APIs present in dnspython 2.3 (Debian 12) are used.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import dns.asyncquery
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset

from requiretls.facts import DnssecState

from .cache import Cache, MemoryCache, SingleFlight
from .errors import BogusDnsError, CacheError, DnsLookupError

log = logging.getLogger("requiretls.dest.dns")

#: RFC 8914 EDE codes that say the resolver found a DNSSEC validation failure.
EDE_BOGUS_CODES = frozenset({6, 7, 8, 9, 10, 11, 12})
_MAX_CNAME_CHAIN = 16
#: Seconds :meth:`DnsClient.check_resolver` waits for the resolver at most.
CHECK_TIMEOUT = 2.0


class LookupStatus(enum.Enum):
    """What the answer contained."""

    ANSWER = "answer"
    NODATA = "nodata"
    NXDOMAIN = "nxdomain"
    ERROR = "error"


@dataclass(frozen=True)
class ResolverSettings:
    """Where the trusted validating resolver is and how long to wait for it.

    ``address=None`` means the first ``nameserver`` of ``/etc/resolv.conf``.
    """

    address: str | None = None
    port: int = 53
    timeout: float = 5.0
    attempts: int = 2
    negative_ttl: int = 300
    max_ttl: int = 86400


@dataclass(frozen=True)
class DnsAnswer:
    """One DNS lookup as seen through the validating resolver.

    ``rdata`` holds each record in presentation form, except TXT, where the
    character-strings of each record are joined without separator (RFC 8461
    section 3.1 requires that for ``_mta-sts``).  ``canonical`` is the owner
    name at the end of the CNAME chain.
    """

    qname: str
    rdtype: str
    status: LookupStatus
    state: DnssecState
    ttl: int
    canonical: str
    rdata: tuple[str, ...] = ()
    error: str = ""
    ede: tuple[int, ...] = field(default=())

    @property
    def secure(self) -> bool:
        return self.state is DnssecState.SECURE

    def raise_for_error(self) -> None:
        """Raise :class:`BogusDnsError` or :class:`DnsLookupError` unless the answer is usable."""
        if self.status is LookupStatus.ERROR or not self.state.trustworthy:
            msg = f"{self.qname}/{self.rdtype}: {self.state.value}: {self.error or 'lookup failed'}"
            if self.state is DnssecState.BOGUS:
                raise BogusDnsError(msg)
            raise DnsLookupError(msg)

    def to_json(self) -> bytes:
        """Compact JSON for the caches: one array (field order as in the class; ``canonical`` is ``null``
        when it equals ``qname``), about half the size of an object with field names."""
        row = [self.qname, self.rdtype, self.status.value, self.state.value, self.ttl,
               None if self.canonical == self.qname else self.canonical, list(self.rdata), self.error,
               list(self.ede)]
        return json.dumps(row, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DnsAnswer:
        """Read :meth:`to_json`'s array, or the object form that earlier versions stored (a shared SQLite or
        Redis cache may still hold it); raises ``ValueError``/``KeyError``/``TypeError`` on anything else."""
        d = json.loads(raw)
        if isinstance(d, dict):
            d = [d["qname"], d["rdtype"], d["status"], d["state"], d["ttl"], d["canonical"], d["rdata"],
                 d["error"], d["ede"]]
        if not isinstance(d, list) or len(d) != 9:
            raise ValueError("not a cached DNS answer")
        qname, rdtype, status, state, ttl, canonical, rdata, error, ede = d
        return cls(
            qname=str(qname),
            rdtype=str(rdtype),
            status=LookupStatus(status),
            state=DnssecState(state),
            ttl=int(ttl),
            canonical=str(qname if canonical is None else canonical),
            rdata=tuple(str(x) for x in rdata),
            error=str(error),
            ede=tuple(int(x) for x in ede),
        )


@dataclass(frozen=True)
class ResolverCheck:
    """What :meth:`DnsClient.check_resolver` found.  ``validates`` is None when the resolver gave no usable
    answer (down, timeout, refused): nothing can be concluded yet."""

    address: str
    port: int
    loopback: bool
    validates: bool | None
    detail: str

    @property
    def trusted(self) -> bool:
        return self.loopback and self.validates is True


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def normalize_name(name: str) -> str:
    """Lower-case A-label form without the final dot; raises ``ValueError`` on garbage."""
    try:
        n = dns.name.from_text(name.strip().rstrip(".") + ".")
    except (dns.exception.DNSException, UnicodeError) as e:
        raise ValueError(f"invalid domain name {name!r}: {e}") from e
    text: str = n.to_text(omit_final_dot=True).lower()
    if not text or text == "@":
        raise ValueError(f"invalid domain name {name!r}")
    return text


def system_nameserver() -> str:
    """The first nameserver of the system resolver configuration."""
    try:
        res = dns.resolver.Resolver(configure=True)
    except dns.exception.DNSException as e:
        raise DnsLookupError(f"no system resolver configured: {e}") from e
    servers = [str(s) for s in res.nameservers]
    if not servers:
        raise DnsLookupError("no nameserver in the system resolver configuration")
    return servers[0]


def _ede_codes(response: dns.message.Message) -> tuple[int, ...]:
    ede_cls = getattr(dns.edns, "EDEOption", None)
    if ede_cls is None:  # pragma: no cover - dnspython < 2.2
        return ()
    return tuple(int(o.code) for o in response.options if isinstance(o, ede_cls))


def _rdata_text(rrset: dns.rrset.RRset) -> tuple[str, ...]:
    out: list[str] = []
    for rd in rrset:
        if rrset.rdtype == dns.rdatatype.TXT:
            out.append(b"".join(rd.strings).decode("ascii", errors="replace"))
        else:
            out.append(rd.to_text())
    return tuple(out)


def _negative_ttl(response: dns.message.Message, default: int) -> int:
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            soa = rrset[0]
            return min(int(rrset.ttl), int(soa.minimum))  # RFC 2308 section 5
    return default


def interpret_response(
    response: dns.message.Message, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, default_nttl: int
) -> DnsAnswer:
    """Classify one reply of the validating resolver (RFC 7672 section 2.1.1)."""
    qtext = qname.to_text(omit_final_dot=True).lower()
    tname = dns.rdatatype.to_text(rdtype)
    rcode = response.rcode()
    ede = _ede_codes(response)
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        bogus = rcode == dns.rcode.SERVFAIL and any(c in EDE_BOGUS_CODES for c in ede)
        state = DnssecState.BOGUS if bogus else DnssecState.INDETERMINATE
        return DnsAnswer(qtext, tname, LookupStatus.ERROR, state, 0, qtext, (),
                         f"rcode {dns.rcode.to_text(rcode)}", ede)
    state = DnssecState.SECURE if response.flags & dns.flags.AD else DnssecState.INSECURE
    current = qname
    ttls: list[int] = []
    for _ in range(_MAX_CNAME_CHAIN):
        try:
            rrset = response.find_rrset(response.answer, current, dns.rdataclass.IN, rdtype)
        except KeyError:
            pass
        else:
            ttls.append(int(rrset.ttl))
            return DnsAnswer(qtext, tname, LookupStatus.ANSWER, state, min(ttls),
                             current.to_text(omit_final_dot=True).lower(), _rdata_text(rrset), "", ede)
        if rdtype == dns.rdatatype.CNAME:
            break
        try:
            cname = response.find_rrset(response.answer, current, dns.rdataclass.IN, dns.rdatatype.CNAME)
        except KeyError:
            break
        ttls.append(int(cname.ttl))
        current = cname[0].target
    else:
        return DnsAnswer(qtext, tname, LookupStatus.ERROR, DnssecState.INDETERMINATE, 0, qtext, (),
                         "CNAME chain too long", ede)
    status = LookupStatus.NXDOMAIN if rcode == dns.rcode.NXDOMAIN else LookupStatus.NODATA
    nttl = _negative_ttl(response, default_nttl)
    ttl = min([nttl, *ttls])
    return DnsAnswer(qtext, tname, status, state, ttl, current.to_text(omit_final_dot=True).lower(), (), "", ede)


class DnsClient:
    """Asynchronous DNSSEC-status-aware lookups with single-flight and a TTL cache.

    Positive and negative answers are cached for their TTL (capped by
    ``max_ttl``); errors are never cached, so a fixed zone is seen at once.
    """

    def __init__(self, settings: ResolverSettings | None = None, cache: Cache | None = None) -> None:
        self.settings = settings or ResolverSettings()
        self._address = self.settings.address
        self.cache: Cache = cache if cache is not None else MemoryCache()
        self._flight: SingleFlight[DnsAnswer] = SingleFlight()

    @property
    def address(self) -> str:
        if self._address is None:
            self._address = system_nameserver()
        return self._address

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        """Look ``name``/``rdtype`` up; never raises for DNS trouble, see :attr:`DnsAnswer.state`."""
        qname = normalize_name(name)
        key = f"dns:{qname}:{rdtype.upper()}"
        cached = await self._cache_get(key)
        if cached is not None:
            return cached
        return await self._flight.run(key, lambda: self._query_and_store(key, qname, rdtype.upper()))

    async def _cache_get(self, key: str) -> DnsAnswer | None:
        try:
            raw = await self.cache.get(key)
            return DnsAnswer.from_json(raw) if raw is not None else None
        except (CacheError, ValueError, KeyError, TypeError) as e:
            log.warning("cache=%s, key=%s, error=%s", type(self.cache).__name__, key, e)
            return None

    async def _query_and_store(self, key: str, qname: str, rdtype: str) -> DnsAnswer:
        answer = await self._query_wire(qname, rdtype)
        if answer.status is not LookupStatus.ERROR and answer.ttl > 0:
            try:
                await self.cache.set(key, answer.to_json(), min(answer.ttl, self.settings.max_ttl))
            except CacheError as e:
                log.warning("cache=%s, key=%s, error=%s", type(self.cache).__name__, key, e)
        return answer

    async def _query_wire(self, qname: str, rdtype: str) -> DnsAnswer:
        name = dns.name.from_text(qname + ".")
        rtype = dns.rdatatype.from_text(rdtype)
        last_error = "no attempt"
        for _attempt in range(max(1, self.settings.attempts)):
            q = dns.message.make_query(name, rtype, use_edns=0, want_dnssec=True, payload=1232)
            q.flags |= dns.flags.AD | dns.flags.RD
            try:
                response, _tcp = await asyncio.wait_for(
                    dns.asyncquery.udp_with_fallback(
                        q, self.address, timeout=self.settings.timeout, port=self.settings.port
                    ),
                    self.settings.timeout * 2,
                )
            except (dns.exception.Timeout, TimeoutError) as e:
                last_error = f"timeout: {e}" if str(e) else "timeout"
                continue
            except (OSError, dns.exception.DNSException, EOFError) as e:
                last_error = f"{type(e).__name__}: {e}"
                continue
            return interpret_response(response, name, rtype, self.settings.negative_ttl)
        return DnsAnswer(qname, rdtype, LookupStatus.ERROR, DnssecState.INDETERMINATE, 0, qname, (),
                         f"resolver {self.address}:{self.settings.port}: {last_error}")

    async def check_resolver(self, ask_remote: bool = False, name: str = ".") -> ResolverCheck:
        """Is the resolver one whose AD bit may be trusted (RFC 7672 section 2.1.1, RFC 6698 section 4.1)?

        It must be reached over a trusted path (a loopback address) and must validate: asked for the root
        zone's DNSKEY RRset with DO set, a validating resolver answers with AD (it checked the set against its
        trust anchor); a plain forwarder or a non-validating cache does not.  A resolver off loopback is asked
        only with ``ask_remote`` (the admin named it).  ``name``: the signed name asked for instead of the root
        (its DNSKEY RRset, or the signed proof that it has none): the answer must carry AD.
        """
        try:
            address = self.address
        except DnsLookupError as e:
            return ResolverCheck("", self.settings.port, False, None, str(e))
        loopback = is_loopback(address)
        if not loopback and not ask_remote:
            return ResolverCheck(address, self.settings.port, False, None, "not on loopback, not asked")
        what = "root DNSKEY" if name.strip(".") == "" else f"{name.rstrip('.')} DNSKEY"
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as e:
            return ResolverCheck(address, self.settings.port, loopback, None, f"bad check name {name!r}: {e}")
        q = dns.message.make_query(qname, dns.rdatatype.DNSKEY, use_edns=0, want_dnssec=True, payload=1232)
        q.flags |= dns.flags.AD | dns.flags.RD
        wait = min(self.settings.timeout, CHECK_TIMEOUT)  # a start-up check: never hold a daemon's start long
        try:
            response, _tcp = await asyncio.wait_for(
                dns.asyncquery.udp_with_fallback(q, address, timeout=wait, port=self.settings.port), wait * 2)
        except (dns.exception.DNSException, TimeoutError, OSError, EOFError) as e:
            return ResolverCheck(address, self.settings.port, loopback, None,
                                 f"no answer to the {what} query: {type(e).__name__} {e}".strip())
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            return ResolverCheck(address, self.settings.port, loopback, None,
                                 f"{what} query answered {dns.rcode.to_text(rcode)}")
        validates = bool(response.flags & dns.flags.AD)
        detail = f"validates (AD set on the {what} answer)" if validates else (
            f"does not validate: the {what} answer came without the AD bit")
        return ResolverCheck(address, self.settings.port, loopback, validates, detail)

    async def query_many(self, name: str, rdtypes: Sequence[str]) -> tuple[DnsAnswer, ...]:
        return tuple(await asyncio.gather(*(self.query(name, t) for t in rdtypes)))
