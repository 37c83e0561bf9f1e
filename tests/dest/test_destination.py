"""Combined destination facts: MX, DNSSEC, DANE and MTA-STS (RFC 7672 section 2.2, RFC 8461,
RFC 8689 section 4.2.1)."""

from __future__ import annotations

import hashlib

import pytest

from requiretls.addresses import NextHop
from requiretls.dest.destination import (
    DaneState,
    Destination,
    DestinationResolver,
    MxSource,
    TlsRequirement,
)
from requiretls.dest.dnssec import DnsClient, DnssecState, ResolverSettings
from requiretls.dest.mtasts import StsResolver, StsSettings
from requiretls.facts import SessionResult, SessionStage
from requiretls.policy.eligibility import Outcome, candidates, judge

from .support import FakeDns, HttpAnswer, PolicyServer, policy_text, run

TLSA_311 = "3 1 1 " + hashlib.sha256(b"key").hexdigest()


def _dest(fake_dns: FakeDns, domain: str, server: PolicyServer | None = None, cafile: str | None = None) -> Destination:
    client = DnsClient(ResolverSettings(address="127.0.0.1", port=fake_dns.port, timeout=0.5, attempts=1))
    sts = None
    if server is not None:
        sts = StsResolver(client, StsSettings(cafile=cafile, https_port=server.port, fetch_timeout=3))
    return run(DestinationResolver(client, sts).lookup(domain))


def _secure_mx(fake_dns: FakeDns, domain: str, *hosts: str, ad: bool = True) -> None:
    fake_dns.add(domain, "MX", *(f"{10 * (i + 1)} {h}." for i, h in enumerate(hosts)), ad=ad)
    for h in hosts:
        fake_dns.host(h, ad=ad)


def test_secure_mx_with_usable_tlsa_demands_dane(fake_dns: FakeDns) -> None:
    """RFC 7672 section 2.2: secure MX + secure usable TLSA: TLS and authentication mandatory."""
    _secure_mx(fake_dns, "dane.test", "mx.dane.test")
    fake_dns.add("_25._tcp.mx.dane.test", "TLSA", TLSA_311)
    d = _dest(fake_dns, "dane.test")
    assert d.source is MxSource.MX and d.mx_state is DnssecState.SECURE
    (host,) = d.hosts
    assert host.dane is DaneState.USABLE and host.usable and host.tls_required
    assert host.auth_method == "dane"
    assert host.tlsa_base == "mx.dane.test"
    assert d.requirement is TlsRequirement.DANE
    assert candidates(d) == (host,)
    verdict = judge(d)
    assert verdict.outcome is Outcome.DELIVER and not verdict.probed


def test_bogus_mx_defers(fake_dns: FakeDns) -> None:
    """RFC 7672 section 2.1.2: bogus MX: we cannot tell which servers to use; delay."""
    fake_dns.servfail("bogus.test", "MX", ede=6)
    d = _dest(fake_dns, "bogus.test")
    assert d.requirement is TlsRequirement.DEFER and d.mx_state is DnssecState.BOGUS
    assert judge(d).outcome is Outcome.DEFER


def test_servfail_mx_defers(fake_dns: FakeDns) -> None:
    fake_dns.servfail("fail.test", "MX")
    d = _dest(fake_dns, "fail.test")
    assert d.requirement is TlsRequirement.DEFER and d.mx_state is DnssecState.INDETERMINATE


def test_tlsa_lookup_failure_makes_that_mx_unusable(fake_dns: FakeDns) -> None:
    """RFC 7672 section 2.1.2: TLSA SERVFAIL: the MX MUST NOT be used; the next one may be."""
    _secure_mx(fake_dns, "two.test", "mx1.two.test", "mx2.two.test")
    fake_dns.servfail("_25._tcp.mx1.two.test", "TLSA")
    fake_dns.add("_25._tcp.mx2.two.test", "TLSA", TLSA_311)
    d = _dest(fake_dns, "two.test")
    mx1, mx2 = d.hosts
    assert mx1.dane is DaneState.FAILED and not mx1.usable
    assert mx2.usable and mx2.dane is DaneState.USABLE
    assert d.requirement is TlsRequirement.DANE
    assert candidates(d) == (mx2,)


def test_tlsa_failure_on_every_mx_defers(fake_dns: FakeDns) -> None:
    _secure_mx(fake_dns, "onemx.test", "mx.onemx.test")
    fake_dns.servfail("_25._tcp.mx.onemx.test", "TLSA", ede=7)
    d = _dest(fake_dns, "onemx.test")
    assert d.requirement is TlsRequirement.DEFER
    assert judge(d).outcome is Outcome.DEFER


def test_secure_but_unusable_tlsa_still_demands_tls(fake_dns: FakeDns) -> None:
    """RFC 7672 section 2.2 / 2.2.3: secure TLSA with only unusable records: TLS mandatory, PKIX auth."""
    _secure_mx(fake_dns, "unusable.test", "mx.unusable.test")
    fake_dns.add("_25._tcp.mx.unusable.test", "TLSA", "1 1 1 " + hashlib.sha256(b"k").hexdigest())
    d = _dest(fake_dns, "unusable.test")
    (host,) = d.hosts
    assert host.dane is DaneState.UNUSABLE and host.tls_required and host.auth_method == "pkix"
    assert host.usable_tlsa == ()
    assert d.requirement is TlsRequirement.DANE


def test_secure_mx_without_tlsa_is_opportunistic(fake_dns: FakeDns) -> None:
    _secure_mx(fake_dns, "notlsa.test", "mx.notlsa.test")
    fake_dns.nxdomain("_25._tcp.mx.notlsa.test", "TLSA", ad=True)
    d = _dest(fake_dns, "notlsa.test")
    assert d.hosts[0].dane is DaneState.NONE
    assert d.requirement is TlsRequirement.OPPORTUNISTIC
    assert candidates(d) == d.hosts  # DNSSEC-validated MX, PKIX authentication


def test_insecure_address_of_secure_mx_skips_tlsa(fake_dns: FakeDns) -> None:
    """RFC 7672 section 2.2.2: with an insecure A/AAAA answer the TLSA lookup SHOULD NOT be made."""
    fake_dns.add("mixed.test", "MX", "10 mx.provider.test.", ad=True)
    fake_dns.host("mx.provider.test", ad=False)
    d = _dest(fake_dns, "mixed.test")
    assert d.hosts[0].dane is DaneState.NOT_APPLICABLE
    assert ("_25._tcp.mx.provider.test", "TLSA") not in fake_dns.queries


def test_tlsa_base_is_cname_expanded_name_first(fake_dns: FakeDns) -> None:
    """RFC 7672 section 2.2.2/2.2.3: secure CNAME: the expanded name is the first TLSA base."""
    fake_dns.add("cn.test", "MX", "10 mx.cn.test.")
    fake_dns.cname("mx.cn.test", "real.cn.test", "A", "127.0.0.1")
    fake_dns.empty("mx.cn.test", "AAAA")
    fake_dns.add("_25._tcp.real.cn.test", "TLSA", TLSA_311)
    d = _dest(fake_dns, "cn.test")
    assert d.hosts[0].tlsa_base == "real.cn.test"
    assert d.hosts[0].dane_reference_names("cn.test") == ("real.cn.test", "cn.test")


def test_insecure_mx_without_sts_cannot_carry_requiretls(fake_dns: FakeDns) -> None:
    """RFC 8689 section 4.2.1 step 2 / section 8.2: an unsigned MX needs MTA-STS validation."""
    _secure_mx(fake_dns, "plain.test", "mx.plain.test", ad=False)
    d = _dest(fake_dns, "plain.test")
    assert d.requirement is TlsRequirement.OPPORTUNISTIC
    assert candidates(d) == ()
    v = judge(d)
    assert v.outcome is Outcome.BOUNCE and v.dsn == "5.7.10"


def _sts(fake_dns: FakeDns, server: PolicyServer, domain: str, mode: str, mx: tuple[str, ...]) -> None:
    fake_dns.add(f"_mta-sts.{domain}", "TXT", '"v=STSv1; id=1"', ad=False)
    fake_dns.host(f"mta-sts.{domain}", ad=False)
    server.answers[f"mta-sts.{domain}"] = HttpAnswer(body=policy_text(mode=mode, mx=mx))


def test_insecure_mx_with_sts_enforce_is_validated_by_the_policy(
        fake_dns: FakeDns, policy_server: PolicyServer, cafile: str) -> None:
    """RFC 8461 section 4.1 + RFC 8689 section 4.2.1: an STS-listed MX is validated."""
    _secure_mx(fake_dns, "insecure.test", "mx.insecure.test", "mx.elsewhere.test", ad=False)
    _sts(fake_dns, policy_server, "insecure.test", "enforce", ("*.insecure.test",))
    d = _dest(fake_dns, "insecure.test", policy_server, cafile)
    assert d.requirement is TlsRequirement.STS_ENFORCE
    assert [h.name for h in candidates(d)] == ["mx.insecure.test"]
    assert d.hosts[1].sts_match is False


def test_sts_testing_mode_neither_enforces_nor_validates_the_mx_for_requiretls(
        fake_dns: FakeDns, policy_server: PolicyServer, cafile: str) -> None:
    """RFC 8461 section 5: in testing mode failures are only reported, so the policy authenticates nothing
    that RFC 8689 section 4.2.1 step 2 could rely on (as Postfix 3.11 fed by an MTA-STS resolver)."""
    _secure_mx(fake_dns, "testing.test", "mx.testing.test", ad=False)
    _sts(fake_dns, policy_server, "testing.test", "testing", ("mx.testing.test",))
    d = _dest(fake_dns, "testing.test", policy_server, cafile)
    assert d.requirement is TlsRequirement.STS_TESTING
    assert candidates(d) == ()
    v = judge(d)
    assert v.outcome is Outcome.BOUNCE and v.dsn == "5.7.10" and "(MTA-STS mode is testing)" in v.reason


def test_sts_mode_none_validates_nothing(fake_dns: FakeDns, policy_server: PolicyServer, cafile: str) -> None:
    _secure_mx(fake_dns, "nonemode.test", "mx.nonemode.test", ad=False)
    _sts(fake_dns, policy_server, "nonemode.test", "none", ())
    d = _dest(fake_dns, "nonemode.test", policy_server, cafile)
    assert d.requirement is TlsRequirement.OPPORTUNISTIC
    assert candidates(d) == ()
    assert "mode is none" in judge(d).reason


def test_dane_is_preferred_over_sts(fake_dns: FakeDns, policy_server: PolicyServer, cafile: str) -> None:
    """RFC 8461 section 2: MTA-STS must not override DANE; DANE wins when both exist."""
    _secure_mx(fake_dns, "dane.test", "mx.dane.test")
    fake_dns.add("_25._tcp.mx.dane.test", "TLSA", TLSA_311)
    _sts(fake_dns, policy_server, "dane.test", "enforce", ("mx.dane.test",))
    d = _dest(fake_dns, "dane.test", policy_server, cafile)
    assert d.requirement is TlsRequirement.DANE
    assert d.sts is not None and d.sts.policy is not None


def test_null_mx_accepts_no_mail(fake_dns: FakeDns) -> None:
    """RFC 7505: a single MX with exchange '.' means the domain accepts no mail."""
    fake_dns.add("null.test", "MX", "0 .")
    d = _dest(fake_dns, "null.test")
    assert d.source is MxSource.NULL_MX and d.requirement is TlsRequirement.NO_MAIL
    assert judge(d).outcome is Outcome.BOUNCE


def test_nonexistent_domain(fake_dns: FakeDns) -> None:
    fake_dns.nxdomain("nowhere.test", "MX")
    d = _dest(fake_dns, "nowhere.test")
    assert d.source is MxSource.NXDOMAIN and d.requirement is TlsRequirement.NO_MAIL


def test_implicit_mx_uses_the_domain_itself(fake_dns: FakeDns) -> None:
    """RFC 5321 section 5.1 / RFC 7672 section 2.2.2: no MX: the domain's own A/AAAA and TLSA."""
    fake_dns.empty("implicit.test", "MX", ad=True)
    fake_dns.host("implicit.test")
    fake_dns.add("_25._tcp.implicit.test", "TLSA", TLSA_311)
    d = _dest(fake_dns, "implicit.test")
    assert d.source is MxSource.IMPLICIT
    assert [h.name for h in d.hosts] == ["implicit.test"]
    assert d.hosts[0].dane is DaneState.USABLE
    assert d.requirement is TlsRequirement.DANE


def test_mx_without_address_is_unusable(fake_dns: FakeDns) -> None:
    fake_dns.add("noaddr.test", "MX", "10 mx.noaddr.test.", "20 mx2.noaddr.test.")
    fake_dns.nxdomain("mx.noaddr.test", "A")
    fake_dns.nxdomain("mx.noaddr.test", "AAAA")
    fake_dns.host("mx2.noaddr.test")
    d = _dest(fake_dns, "noaddr.test")
    assert not d.hosts[0].usable and d.hosts[1].usable


def test_mx_hosts_are_sorted_by_preference(fake_dns: FakeDns) -> None:
    """RFC 7672 section 2.2.1: preference order; TLSA presence does not reorder."""
    fake_dns.add("order.test", "MX", "20 b.order.test.", "10 a.order.test.")
    fake_dns.host("a.order.test")
    fake_dns.host("b.order.test")
    fake_dns.add("_25._tcp.b.order.test", "TLSA", TLSA_311)
    d = _dest(fake_dns, "order.test")
    assert [h.name for h in d.hosts] == ["a.order.test", "b.order.test"]


def test_address_literal_is_refused(fake_dns: FakeDns) -> None:
    with pytest.raises(ValueError):
        _dest(fake_dns, "127.0.0.1")


def test_probe_results_decide_between_5_7_30_and_5_7_10(fake_dns: FakeDns) -> None:
    """RFC 8689 section 4.2.1: no REQUIRETLS after STARTTLS: 5.7.30; no authenticated TLS: 5.7.10."""
    _secure_mx(fake_dns, "two.test", "mx1.two.test", "mx2.two.test")
    d = _dest(fake_dns, "two.test")
    no_rt = SessionResult("mx1.two.test", stage=SessionStage.DONE, connected=True, starttls=True, verified=True,
                          verification="pkix")
    bad_cert = SessionResult("mx2.two.test", stage=SessionStage.HANDSHAKE, connected=True, starttls=False,
                             error="certificate verification failed")
    bad_cert1 = SessionResult("mx1.two.test", stage=SessionStage.HANDSHAKE, connected=True, starttls=False,
                              error="certificate verification failed")
    ok = SessionResult("mx2.two.test", stage=SessionStage.DONE, connected=True, starttls=True, verified=True,
                       requiretls=True, verification="pkix", tls_version="TLSv1.3")
    v = judge(d, [no_rt, bad_cert])
    assert v.outcome is Outcome.BOUNCE and v.dsn == "5.7.30"
    v = judge(d, [bad_cert1, bad_cert])
    assert v.dsn == "5.7.10"
    v = judge(d, [no_rt, ok])
    assert v.deliverable and v.mx == "mx2.two.test" and v.probed


def test_relayhost_tlsa_is_looked_up_at_its_own_port(fake_dns: FakeDns) -> None:
    """RFC 7672 section 2.2.3 / RFC 6698 section 3: a next hop reached on port 587 has its TLSA records at
    ``_587._tcp``; those of port 25 say nothing about it."""
    fake_dns.host("smart.relay.test")
    fake_dns.add("_587._tcp.smart.relay.test", "TLSA", TLSA_311)
    client = DnsClient(ResolverSettings(address="127.0.0.1", port=fake_dns.port, timeout=0.5, attempts=1))
    resolver = DestinationResolver(client)
    on_587 = run(resolver.nexthop("smart.relay.test", 587))
    assert on_587.requirement is TlsRequirement.DANE
    assert on_587.hosts[0].dane is DaneState.USABLE
    on_25 = run(resolver.nexthop("smart.relay.test"))
    assert on_25.requirement is TlsRequirement.OPPORTUNISTIC
    assert on_25.hosts[0].dane is DaneState.NONE


def _resolver(fake_dns: FakeDns) -> DestinationResolver:
    return DestinationResolver(DnsClient(ResolverSettings(address="127.0.0.1", port=fake_dns.port, timeout=0.5,
                                                          attempts=1)))


def test_relayhost_without_brackets_is_an_mx_lookup(fake_dns: FakeDns) -> None:
    """smtp(8) / postconf(5) relayhost: ``example.com`` means the MX hosts of example.com, as for a recipient
    domain (MX with its DNSSEC state); only ``[example.com]`` suppresses the MX lookup."""
    _secure_mx(fake_dns, "relay.test", "mx1.relay.test")
    fake_dns.add("_25._tcp.mx1.relay.test", "TLSA", TLSA_311)
    fake_dns.host("relay.test", "127.0.0.9")  # the name's own address must not be used
    d = run(_resolver(fake_dns).resolve(NextHop.parse("relay.test")))
    assert ("relay.test", "MX") in fake_dns.queries
    assert ("relay.test", "A") not in fake_dns.queries
    assert d.source is MxSource.MX and [h.name for h in d.hosts] == ["mx1.relay.test"]
    assert d.requirement is TlsRequirement.DANE and d.hosts[0].dane is DaneState.USABLE
    assert d == _dest(fake_dns, "relay.test")  # exactly lookup(domain)


def test_relayhost_without_brackets_uses_its_port_for_tlsa(fake_dns: FakeDns) -> None:
    """``relay.test:587``: the MX hosts of relay.test, reached on 587, so TLSA at ``_587._tcp`` (RFC 7672
    section 2.2.3)."""
    _secure_mx(fake_dns, "sub.relay.test", "mx.sub.relay.test")
    fake_dns.add("_587._tcp.mx.sub.relay.test", "TLSA", TLSA_311)
    resolver = _resolver(fake_dns)
    on_587 = run(resolver.resolve(NextHop.parse("sub.relay.test:587")))
    assert on_587.hosts[0].name == "mx.sub.relay.test" and on_587.hosts[0].dane is DaneState.USABLE
    assert on_587.requirement is TlsRequirement.DANE
    on_25 = run(resolver.resolve(NextHop.parse("sub.relay.test")))  # not the 587 answer from the flight
    assert on_25.hosts[0].dane is DaneState.NONE and on_25.requirement is TlsRequirement.OPPORTUNISTIC


def test_bracketed_relayhost_is_an_address_lookup_with_tlsa_at_its_port(fake_dns: FakeDns) -> None:
    """``[smart.relay.test]:587``: no MX lookup, the host's A/AAAA, TLSA at ``_587._tcp.smart.relay.test``."""
    fake_dns.host("smart.relay.test")
    fake_dns.add("smart.relay.test", "MX", "10 elsewhere.relay.test.")  # must be ignored
    fake_dns.add("_587._tcp.smart.relay.test", "TLSA", TLSA_311)
    d = run(_resolver(fake_dns).resolve(NextHop.parse("[smart.relay.test]:587")))
    assert ("smart.relay.test", "MX") not in fake_dns.queries
    assert ("smart.relay.test", "A") in fake_dns.queries
    assert ("_587._tcp.smart.relay.test", "TLSA") in fake_dns.queries
    assert ("_25._tcp.smart.relay.test", "TLSA") not in fake_dns.queries
    assert [h.name for h in d.hosts] == ["smart.relay.test"]
    assert d.requirement is TlsRequirement.DANE and d.hosts[0].dane is DaneState.USABLE
