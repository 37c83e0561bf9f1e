"""The testbed's fixed world: addresses, zones, MX hosts and MTA-STS policies.

Everything is static data so that tests, the README table and the running services agree on one source.
All addresses are in 127.0.0.0/8 (Linux routes the whole block to ``lo``, so binding needs no setup), and
every name lives under the private TLD ``test.`` (RFC 6761), below a private signed root.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

TLD = "test."

NSD_IP = "127.0.53.1"
"""The authoritative server: serves the root, ``test.`` and every child zone."""
UNBOUND_IP = "127.0.53.53"
"""The validating resolver; the test resolv.conf points here (port 53)."""
LAME_IP = "127.0.53.254"
"""A second NSD with no zones: it answers REFUSED for everything, so zones delegated to it (a lame
delegation) come back SERVFAIL from the resolver at once.  A silent address would cost every lookup the
resolver's full retry schedule (more than 8 s), too slow for tests."""
HTTPS_IP = "127.0.3.1"
"""The MTA-STS policy server (port 443, one certificate per host via SNI)."""
NS_NAME = "ns1.nic.test."
LAME_NS_NAME = "lame.nic.test."


class Cert(enum.Enum):
    """Which certificate an MX presents after STARTTLS."""

    GOOD = "good"  # issued by the test CA for the MX name, valid now
    EXPIRED = "expired"  # test CA, right name, notAfter in the past
    WRONG_NAME = "wrong-name"  # test CA, valid, but for another name
    SELF_SIGNED = "self-signed"  # right name, valid, not issued by the test CA


class Dnssec(enum.Enum):
    """What the validating resolver concludes for a zone."""

    SECURE = "secure"  # signed, DS in test.
    INSECURE = "insecure"  # unsigned, no DS (NSEC proves it)
    BOGUS = "bogus"  # DS in test., signatures broken
    SERVFAIL = "servfail"  # lame delegation: its server refuses to answer


class StsHttp(enum.Enum):
    """How the HTTPS server answers for a domain's ``mta-sts.`` host (RFC 8461 section 3.3 cases)."""

    OK = "ok"
    REDIRECT = "redirect"  # 301 to another policy host: must not be followed
    OVERSIZE = "oversize"  # valid policy padded past 64 KiB
    MEDIA_TYPE = "media-type"  # served as text/html
    BAD_CERT = "bad-cert"  # the policy host's certificate is self-signed


@dataclass(frozen=True)
class MxHost:
    """One test MX server: port 25 on its own loopback address."""

    key: str
    fqdn: str  # absolute, with trailing dot
    ip: str
    starttls: bool = True
    requiretls: bool = True  # advertised only after STARTTLS, never in plaintext
    cert: Cert = Cert.GOOD

    @property
    def hostname(self) -> str:
        return self.fqdn.rstrip(".")


@dataclass(frozen=True)
class StsPolicy:
    """An MTA-STS setup: the ``_mta-sts`` TXT record(s) and what the policy host serves."""

    mode: str = "enforce"
    mx: tuple[str, ...] = ()  # policy mx patterns; empty = the domain's own MX names
    txt: tuple[str, ...] = ("v=STSv1; id=20261123T000000;",)
    http: StsHttp = StsHttp.OK
    max_age: int = 86400


@dataclass(frozen=True)
class Domain:
    """A mail domain of the bed, one DNS zone each."""

    name: str  # absolute, with trailing dot
    dnssec: Dnssec
    mx: tuple[tuple[int, str], ...] = ()  # (preference, MxHost.key)
    tlsa: bool = False  # TLSA 3 1 1 for every MX, from the MX's certificate
    tlsa_mismatch: bool = False  # publish TLSA 3 1 1 with a wrong digest
    sts: StsPolicy | None = None
    purpose: str = ""
    extra: tuple[str, ...] = field(default=())  # extra zone-file lines, relative to the zone

    @property
    def domain(self) -> str:
        return self.name.rstrip(".")


def _mx(n: int, key: str, fqdn: str, **kw: object) -> MxHost:
    return MxHost(key=key, fqdn=fqdn, ip=f"127.0.2.{n}", **kw)  # type: ignore[arg-type]


MX_HOSTS: tuple[MxHost, ...] = (
    _mx(1, "dane", "mx.dane.test."),
    _mx(2, "dane-norequiretls", "mx.dane-norequiretls.test.", requiretls=False),
    _mx(3, "signed", "mx.signed.test."),
    _mx(4, "insecure", "mx.insecure.test."),
    _mx(5, "bogus", "mx.bogus.test."),
    _mx(6, "dane-nostarttls", "mx.dane-nostarttls.test.", starttls=False, requiretls=False),
    _mx(7, "twomx-1", "mx1.twomx.test.", requiretls=False, cert=Cert.EXPIRED),
    _mx(8, "twomx-2", "mx2.twomx.test."),
    _mx(9, "expired", "mx.expired.test.", cert=Cert.EXPIRED),
    _mx(10, "wrongname", "mx.wrongname.test.", cert=Cert.WRONG_NAME),
    _mx(11, "selfsigned", "mx.selfsigned.test.", cert=Cert.SELF_SIGNED),
    _mx(12, "sts", "mx.sts.test."),
    _mx(13, "sts-redirect", "mx.sts-redirect.test."),
    _mx(14, "sts-oversize", "mx.sts-oversize.test."),
    _mx(15, "sts-mediatype", "mx.sts-mediatype.test."),
    _mx(16, "sts-badcert", "mx.sts-badcert.test."),
    _mx(17, "sts-twotxt", "mx.sts-twotxt.test."),
    _mx(18, "sts-testing", "mx.sts-testing.test."),
    _mx(19, "toggle", "mx.toggle.test."),
    _mx(20, "sender", "mx.sender.test."),
    _mx(21, "plain", "mx.plain.test.", starttls=False, requiretls=False),
    _mx(22, "sts-norequiretls", "mx.sts-norequiretls.test.", requiretls=False),
    _mx(23, "dane-mismatch", "mx.dane-mismatch.test."),
    _mx(24, "insecure-norequiretls", "mx.insecure-norequiretls.test.", requiretls=False),
    _mx(25, "sts-wrongmx", "mx.sts-wrongmx.test."),
    _mx(26, "sts-stall", "mx.sts-stall.test."),
    _mx(27, "sts-deep", "a.b.sts-deep.test."),
    _mx(28, "sts-wild", "mx.sts-wild.test."),
    _mx(29, "sts-mixed-deep", "a.b.sts-mixed.test."),
    _mx(30, "sts-mixed", "mx.sts-mixed.test."),
)

MX_BY_KEY: dict[str, MxHost] = {m.key: m for m in MX_HOSTS}

_S, _I, _B, _F = Dnssec.SECURE, Dnssec.INSECURE, Dnssec.BOGUS, Dnssec.SERVFAIL

DOMAINS: tuple[Domain, ...] = (
    Domain(
        "dane.test.",
        _S,
        ((10, "dane"),),
        tlsa=True,
        purpose="DANE: signed MX + TLSA 3 1 1, MX advertises REQUIRETLS",
    ),
    Domain(
        "dane-norequiretls.test.",
        _S,
        ((10, "dane-norequiretls"),),
        tlsa=True,
        purpose="DANE, but the MX does not advertise REQUIRETLS",
    ),
    Domain(
        "signed.test.",
        _S,
        ((10, "signed"),),
        purpose="signed MX without TLSA (DNSSEC alone authenticates nothing for TLS)",
    ),
    Domain(
        "insecure.test.",
        _I,
        ((10, "insecure"),),
        purpose="unsigned MX (insecure delegation, NSEC-proven no DS)",
    ),
    Domain(
        "insecure-norequiretls.test.",
        _I,
        ((10, "insecure-norequiretls"),),
        purpose="unsigned MX with STARTTLS but no REQUIRETLS",
    ),
    Domain(
        "bogus.test.",
        _B,
        ((10, "bogus"),),
        tlsa=True,
        purpose="DS in test., every signature broken: resolver answers SERVFAIL",
    ),
    Domain(
        "dane-nostarttls.test.",
        _S,
        ((10, "dane-nostarttls"),),
        tlsa=True,
        purpose="TLSA published, MX offers no STARTTLS",
    ),
    Domain(
        "dane-mismatch.test.",
        _S,
        ((10, "dane-mismatch"),),
        tlsa=True,
        tlsa_mismatch=True,
        purpose="TLSA 3 1 1 that matches no certificate",
    ),
    Domain(
        "twomx.test.",
        _S,
        ((10, "twomx-1"), (20, "twomx-2")),
        tlsa=True,
        purpose="two MX; the preferred one has no REQUIRETLS and an expired cert, the second qualifies",
    ),
    Domain(
        "expired.test.",
        _I,
        ((10, "expired"),),
        sts=StsPolicy(),
        purpose="MTA-STS enforce; MX certificate expired",
    ),
    Domain(
        "wrongname.test.",
        _I,
        ((10, "wrongname"),),
        sts=StsPolicy(),
        purpose="MTA-STS enforce; MX certificate for another name",
    ),
    Domain(
        "selfsigned.test.",
        _I,
        ((10, "selfsigned"),),
        sts=StsPolicy(),
        purpose="MTA-STS enforce; MX certificate self-signed",
    ),
    Domain(
        "sts.test.",
        _I,
        ((10, "sts"),),
        sts=StsPolicy(),
        purpose="MTA-STS enforce, everything valid, MX advertises REQUIRETLS",
    ),
    Domain(
        "sts-norequiretls.test.",
        _I,
        ((10, "sts-norequiretls"),),
        sts=StsPolicy(),
        purpose="MTA-STS enforce, valid, MX without REQUIRETLS",
    ),
    Domain(
        "sts-testing.test.",
        _I,
        ((10, "sts-testing"),),
        sts=StsPolicy(mode="testing"),
        purpose="MTA-STS mode testing",
    ),
    Domain(
        "sts-stall.test.",
        _I,
        ((10, "sts-stall"),),
        sts=StsPolicy(),
        purpose="like sts.test; Bed.sts_stall() makes its policy host hold requests unanswered (fetch timeout)",
    ),
    Domain(
        "sts-redirect.test.",
        _I,
        ((10, "sts-redirect"),),
        sts=StsPolicy(http=StsHttp.REDIRECT),
        purpose="policy fetch answers 301 (RFC 8461 3.3: must not follow)",
    ),
    Domain(
        "sts-oversize.test.",
        _I,
        ((10, "sts-oversize"),),
        sts=StsPolicy(http=StsHttp.OVERSIZE),
        purpose="policy larger than 64 KiB",
    ),
    Domain(
        "sts-mediatype.test.",
        _I,
        ((10, "sts-mediatype"),),
        sts=StsPolicy(http=StsHttp.MEDIA_TYPE),
        purpose="policy served as text/html",
    ),
    Domain(
        "sts-badcert.test.",
        _I,
        ((10, "sts-badcert"),),
        sts=StsPolicy(http=StsHttp.BAD_CERT),
        purpose="policy host presents a self-signed certificate",
    ),
    Domain(
        "sts-twotxt.test.",
        _I,
        ((10, "sts-twotxt"),),
        sts=StsPolicy(txt=("v=STSv1; id=20261123T000001;", "v=STSv1; id=20261123T000002;")),
        purpose="two v=STSv1 TXT records (RFC 8461 3.1: treat as no policy)",
    ),
    Domain(
        "sts-wrongmx.test.",
        _I,
        ((10, "sts-wrongmx"),),
        sts=StsPolicy(mx=("mx.elsewhere.test",)),
        purpose="MTA-STS enforce whose policy does not list the domain's MX (RFC 8461 4.1: refuse it)",
    ),
    Domain(
        "sts-deep.test.",
        _I,
        ((10, "sts-deep"),),
        sts=StsPolicy(mx=("*.sts-deep.test",)),
        purpose="MTA-STS enforce, mx *.sts-deep.test; the MX a.b.sts-deep.test is two labels below (RFC 8461 4.1: "
        "refuse it), its certificate valid for its name",
    ),
    Domain(
        "sts-wild.test.",
        _I,
        ((10, "sts-wild"),),
        sts=StsPolicy(mx=("*.sts-wild.test",)),
        purpose="MTA-STS enforce, mx *.sts-wild.test; the MX mx.sts-wild.test is one label below (allowed); "
        "publishes a TLSRPT record",
        extra=('_smtp._tls 300 IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@sts-wild.test"',),
    ),
    Domain(
        "sts-mixed.test.",
        _I,
        ((10, "sts-mixed-deep"), (20, "sts-mixed")),
        sts=StsPolicy(mx=("*.sts-mixed.test",)),
        purpose="MTA-STS enforce, mx *.sts-mixed.test; preferred MX a.b.sts-mixed.test (two labels below: not to be "
        "used), second MX mx.sts-mixed.test (allowed)",
    ),
    Domain(
        "toggle.test.",
        _S,
        ((10, "toggle"),),
        tlsa=True,
        purpose="like dane.test; Bed.dns.servfail() switches it to SERVFAIL at run time",
    ),
    Domain("sender.test.", _S, ((10, "sender"),), purpose="the test senders' domain: DSNs land on its MX"),
    Domain("plain.test.", _I, ((10, "plain"),), purpose="unsigned MX without STARTTLS"),
    Domain(
        "servfail.test.",
        _F,
        purpose="lame delegation (its server answers REFUSED): resolver answers SERVFAIL",
    ),
)

DOMAIN_BY_NAME: dict[str, Domain] = {d.domain: d for d in DOMAINS}


def domain_mx_hosts(d: Domain) -> list[MxHost]:
    return [MX_BY_KEY[k] for _, k in d.mx]


def mx_domain(m: MxHost) -> Domain:
    """The zone an MX host's name lives in."""
    for d in DOMAINS:
        if any(k == m.key for _, k in d.mx):
            return d
    raise KeyError(m.key)
