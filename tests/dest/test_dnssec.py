"""DNSSEC state of answers from a validating resolver (RFC 7672 section 2.1, RFC 4035, RFC 8914)."""

from __future__ import annotations

import asyncio

import pytest

from requiretls.dest.cache import Cache
from requiretls.dest.dnssec import (
    DnsClient,
    DnssecState,
    LookupStatus,
    ResolverCheck,
    ResolverSettings,
    is_loopback,
    normalize_name,
)
from requiretls.dest.errors import BogusDnsError, DnsLookupError

from .support import FakeDns, run


def test_answer_with_ad_bit_is_secure(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    """RFC 4035 section 3.2.3 / RFC 7672 section 2.1.1: AD from the trusted resolver means secure."""
    fake_dns.add("good.test", "MX", "10 mx.good.test.", ad=True)
    a = run(dns_client.query("good.test", "MX"))
    assert a.status is LookupStatus.ANSWER
    assert a.state is DnssecState.SECURE
    assert a.rdata == ("10 mx.good.test.",)
    assert a.ttl == 300


def test_answer_without_ad_bit_is_insecure(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    """RFC 7672 section 2.1.1: an answer from an unsigned zone is insecure, not an error."""
    fake_dns.add("plain.test", "MX", "10 mx.plain.test.", ad=False)
    a = run(dns_client.query("plain.test", "MX"))
    assert a.state is DnssecState.INSECURE
    assert a.status is LookupStatus.ANSWER
    a.raise_for_error()


def test_servfail_with_dnssec_ede_is_bogus(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    """RFC 8914 EDE 6 (DNSSEC Bogus) on SERVFAIL: bogus; RFC 7672 section 2.1.2: defer."""
    fake_dns.servfail("bogus.test", "MX", ede=6)
    a = run(dns_client.query("bogus.test", "MX"))
    assert a.state is DnssecState.BOGUS
    assert a.status is LookupStatus.ERROR
    assert a.ede == (6,)
    with pytest.raises(BogusDnsError):
        a.raise_for_error()


def test_servfail_without_ede_is_indeterminate(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    """RFC 7672 section 2.1.1: a SERVFAIL we cannot explain is indeterminate, treated as bogus."""
    fake_dns.servfail("fail.test", "MX")
    a = run(dns_client.query("fail.test", "MX"))
    assert a.state is DnssecState.INDETERMINATE
    assert not a.state.trustworthy
    with pytest.raises(DnsLookupError):
        a.raise_for_error()


def test_timeout_is_indeterminate(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    """A resolver that does not answer gives no answer we may act on (RFC 7672 section 2.1.2)."""
    fake_dns.drop("slow.test", "MX")
    a = run(dns_client.query("slow.test", "MX"))
    assert a.state is DnssecState.INDETERMINATE
    assert "timeout" in a.error


def test_refused_is_indeterminate(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    fake_dns.servfail("refused.test", "MX")
    fake_dns.replies[("refused.test", "MX")].rcode = 5
    a = run(dns_client.query("refused.test", "MX"))
    assert a.state is DnssecState.INDETERMINATE


def test_secure_nxdomain_is_authenticated_denial(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    """RFC 7672 section 2.1.1: secure NXDOMAIN is not an error; negative TTL from the SOA (RFC 2308)."""
    fake_dns.nxdomain("gone.test", "MX", ad=True)
    a = run(dns_client.query("gone.test", "MX"))
    assert a.status is LookupStatus.NXDOMAIN
    assert a.state is DnssecState.SECURE
    assert a.ttl == 60


def test_nodata_is_reported_as_nodata(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    fake_dns.empty("nomx.test", "MX", ad=False)
    a = run(dns_client.query("nomx.test", "MX"))
    assert a.status is LookupStatus.NODATA
    assert a.state is DnssecState.INSECURE


def test_cname_chain_is_followed_to_the_canonical_name(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    """RFC 7672 section 2.2.2: the CNAME-expanded name is the first TLSA base candidate."""
    fake_dns.cname("alias.good.test", "real.good.test", "A", "127.0.0.9")
    a = run(dns_client.query("alias.good.test", "A"))
    assert a.canonical == "real.good.test"
    assert a.rdata == ("127.0.0.9",)


def test_txt_strings_are_joined_without_separator(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    """RFC 8461 section 3.1: multi-string TXT records are concatenated without spaces."""
    fake_dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; " "id=20240101"')
    a = run(dns_client.query("_mta-sts.good.test", "TXT"))
    assert a.rdata == ("v=STSv1; id=20240101",)


def test_answers_are_cached_for_their_ttl(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    fake_dns.add("good.test", "MX", "10 mx.good.test.")

    async def twice() -> None:
        await dns_client.query("good.test", "MX")
        await dns_client.query("GOOD.test.", "MX")

    run(twice())
    assert fake_dns.queries.count(("good.test", "MX")) == 1


def test_errors_are_not_cached(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    """A SERVFAIL must not outlive its cause: the next lookup asks again."""
    fake_dns.servfail("fail.test", "MX")

    async def twice() -> None:
        await dns_client.query("fail.test", "MX")
        await dns_client.query("fail.test", "MX")

    run(twice())
    assert fake_dns.queries.count(("fail.test", "MX")) == 2


def test_concurrent_lookups_are_coalesced(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    """Single flight: ten concurrent lookups of one name send one query."""
    fake_dns.add("good.test", "MX", "10 mx.good.test.")

    async def many() -> None:
        answers = await asyncio.gather(*(dns_client.query("good.test", "MX") for _ in range(10)))
        assert len({a.rdata for a in answers}) == 1

    run(many())
    assert fake_dns.queries.count(("good.test", "MX")) == 1


def test_negative_answers_are_cached_in_every_backend(fake_dns: FakeDns, dns_settings: ResolverSettings,
                                                      cache_backend: Cache) -> None:
    fake_dns.nxdomain("gone.test", "MX")
    client = DnsClient(dns_settings, cache_backend)

    async def twice() -> None:
        a = await client.query("gone.test", "MX")
        b = await client.query("gone.test", "MX")
        assert a == b

    run(twice())
    assert fake_dns.queries.count(("gone.test", "MX")) == 1


def test_normalize_name_rejects_garbage() -> None:
    assert normalize_name("Example.COM.") == "example.com"
    with pytest.raises(ValueError):
        normalize_name("a..b")


def test_broken_cache_degrades_to_a_fresh_lookup(fake_dns: FakeDns, dns_settings: ResolverSettings) -> None:
    """A cache failure costs a lookup, never the answer."""
    from requiretls.dest.cache import RedisCache

    fake_dns.add("good.test", "MX", "10 mx.good.test.")
    client = DnsClient(dns_settings, RedisCache("redis://127.0.0.1:1/0", timeout=0.3))
    a = run(client.query("good.test", "MX"))
    assert a.state is DnssecState.SECURE and a.rdata == ("10 mx.good.test.",)


def test_cached_answer_form_round_trips_and_old_entries_still_read() -> None:
    from requiretls.dest.dnssec import DnsAnswer, DnssecState, LookupStatus

    same = DnsAnswer("a.test", "MX", LookupStatus.ANSWER, DnssecState.SECURE, 300, "a.test", ("10 mx.a.test.",))
    alias = DnsAnswer("www.a.test", "A", LookupStatus.ANSWER, DnssecState.INSECURE, 60, "host.b.test",
                      ("192.0.2.1", "192.0.2.2"), "", (9,))
    for ans in (same, alias):
        assert DnsAnswer.from_json(ans.to_json()) == ans
    assert len(same.to_json()) < 80  # the array form, not an object with field names
    # what a shared SQLite/Redis cache written by an earlier version holds
    old = (b'{"qname":"a.test","rdtype":"MX","status":"answer","state":"secure","ttl":300,'
           b'"canonical":"a.test","rdata":["10 mx.a.test."],"error":"","ede":[]}')
    assert DnsAnswer.from_json(old) == same
    for junk in (b"[]", b'"x"', b"[1,2,3]", b'{"qname":"a"}', b'["a","MX","nope","secure",1,null,[],"",[]]'):
        with pytest.raises((ValueError, KeyError, TypeError)):
            DnsAnswer.from_json(junk)


# --- is the resolver one whose AD bit may be trusted? (RFC 7672 section 2.1.1) ------------------------------


def test_validating_loopback_resolver_is_trusted(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    fake_dns.empty(".", "DNSKEY", ad=True)
    check = run(dns_client.check_resolver())
    assert check.loopback and check.validates is True and check.trusted, check


def test_resolver_that_does_not_set_ad_on_the_root_does_not_validate(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    fake_dns.empty(".", "DNSKEY", ad=False)
    check = run(dns_client.check_resolver())
    assert check.validates is False and not check.trusted
    assert "does not validate" in check.detail


def test_silent_resolver_tells_nothing(fake_dns: FakeDns, dns_client: DnsClient) -> None:
    fake_dns.drop(".", "DNSKEY")
    check = run(dns_client.check_resolver())
    assert check.validates is None and not check.trusted and "no answer" in check.detail


def test_resolver_off_loopback_is_not_trusted_even_when_it_validates() -> None:
    """A validating resolver across a network: its AD bit can be forged on the way (RFC 6698 section 4.1)."""
    assert not ResolverCheck("192.0.2.53", 53, is_loopback("192.0.2.53"), True, "validates").trusted
    assert ResolverCheck("127.0.53.53", 53, is_loopback("127.0.53.53"), True, "validates").trusted
    assert is_loopback("::1") and not is_loopback("not-an-address")
