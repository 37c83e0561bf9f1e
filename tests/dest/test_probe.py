"""REQUIRETLS probe against real local STARTTLS servers (RFC 8689 section 4.2.1, RFC 3207)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from requiretls.dest.dane import make_tlsa
from requiretls.dest.destination import Destination, DestinationResolver
from requiretls.dest.dnssec import DnsClient, ResolverSettings
from requiretls.dest.probe import Prober, ProbeSettings, probe_sync
from requiretls.policy.eligibility import candidates, judge, qualifies

from .support import FakeDns, Issued, SmtpServer, TestCA, run, server_context


@pytest.fixture
def leaf(ca: TestCA) -> Issued:
    return ca.leaf("mx.good.test")


@pytest.fixture
def smtp(leaf: Issued, tmp_path: Path) -> Iterator[SmtpServer]:
    srv = SmtpServer(server_context(tmp_path, leaf), requiretls=True)
    yield srv
    srv.close()


def _settings(port: int, cafile: str | None, **kw: float) -> ProbeSettings:
    return ProbeSettings(port=port, timeout=5.0, cafile=cafile, helo_name="probe.test", **kw)


def _dest(fake_dns: FakeDns, tlsa: str | None = None) -> Destination:
    fake_dns.add("good.test", "MX", "10 mx.good.test.")
    fake_dns.host("mx.good.test")
    if tlsa:
        fake_dns.add("_25._tcp.mx.good.test", "TLSA", tlsa)
    client = DnsClient(ResolverSettings(address="127.0.0.1", port=fake_dns.port, timeout=0.5, attempts=1))
    return run(DestinationResolver(client).lookup("good.test"))


def test_pkix_verified_server_advertising_requiretls(smtp: SmtpServer, cafile: str) -> None:
    """RFC 8689 section 4.2.1 steps 3-5: EHLO, STARTTLS, PKIX with the MX name, REQUIRETLS after TLS."""
    r = probe_sync("mx.good.test", ["127.0.0.1"], _settings(smtp.port, cafile))
    assert r.connected and r.starttls and r.verified, r
    assert r.verification == "pkix"
    assert r.requiretls and qualifies(r)
    assert r.tls_version in ("TLSv1.2", "TLSv1.3")
    assert r.certificate["names"] == "mx.good.test"


def test_server_without_requiretls_is_reported(leaf: Issued, tmp_path: Path, cafile: str) -> None:
    srv = SmtpServer(server_context(tmp_path, leaf), requiretls=False)
    try:
        r = probe_sync("mx.good.test", ["127.0.0.1"], _settings(srv.port, cafile))
    finally:
        srv.close()
    assert r.tls_ok and not r.requiretls


def test_requiretls_only_counts_after_starttls(smtp: SmtpServer, cafile: str) -> None:
    """RFC 8689 section 2: the keyword must be in the EHLO response after STARTTLS; our test
    server only shows it there, and the probe reads the post-TLS EHLO."""
    r = probe_sync("mx.good.test", ["127.0.0.1"], _settings(smtp.port, cafile))
    assert "requiretls" in r.extensions and "starttls" not in r.extensions


def test_pkix_name_mismatch_fails_verification(smtp: SmtpServer, cafile: str) -> None:
    r = probe_sync("mx.other.test", ["127.0.0.1"], _settings(smtp.port, cafile))
    assert r.connected and not r.tls_ok
    assert "certificate" in r.verify_error


def test_untrusted_ca_fails_verification(smtp: SmtpServer, tmp_path: Path) -> None:
    other = TestCA("other root").write_root(tmp_path / "other.pem")
    r = probe_sync("mx.good.test", ["127.0.0.1"], _settings(smtp.port, other))
    assert not r.tls_ok and not qualifies(r)


def test_expired_certificate_fails_pkix(ca: TestCA, tmp_path: Path, cafile: str) -> None:
    srv = SmtpServer(server_context(tmp_path, ca.leaf("mx.good.test", expired=True)))
    try:
        r = probe_sync("mx.good.test", ["127.0.0.1"], _settings(srv.port, cafile))
    finally:
        srv.close()
    assert not r.tls_ok and "expired" in r.verify_error


def test_dane_ee_authenticates_without_pkix(smtp: SmtpServer, leaf: Issued, tmp_path: Path) -> None:
    """RFC 7672 section 3.1.1: DANE-EE needs no trusted CA and no name match."""
    untrusted = TestCA("other").write_root(tmp_path / "o.pem")
    r = probe_sync("mx.good.test", ["127.0.0.1"], _settings(smtp.port, untrusted), tlsa=[make_tlsa(leaf.der)],
                   dane_names=["mx.good.test"])
    assert r.verification == "dane" and r.verified and qualifies(r)


def test_dane_ta_sees_the_chain_the_server_sent(ca: TestCA, tmp_path: Path) -> None:
    inter = ca.intermediate()
    leaf = ca.leaf("mx.good.test", issuer=inter)
    srv = SmtpServer(server_context(tmp_path, leaf, (inter,)))
    try:
        r = probe_sync("mx.good.test", ["127.0.0.1"], _settings(srv.port, None),
                       tlsa=[make_tlsa(inter.der, 2, 0, 1)], dane_names=["mx.good.test"])
    finally:
        srv.close()
    assert r.verified, r.verify_error


def test_dane_mismatch_fails(smtp: SmtpServer) -> None:
    wrong = make_tlsa(TestCA("x").leaf("mx.good.test").der)
    r = probe_sync("mx.good.test", ["127.0.0.1"], _settings(smtp.port, None), tlsa=[wrong],
                   dane_names=["mx.good.test"])
    assert r.starttls and not r.verified and "DANE" in r.verify_error


def test_no_starttls_is_reported(cafile: str) -> None:
    srv = SmtpServer(None, starttls=False)
    try:
        r = probe_sync("mx.good.test", ["127.0.0.1"], _settings(srv.port, cafile))
    finally:
        srv.close()
    assert r.connected and not r.starttls and "STARTTLS not offered" in r.error


def test_connection_refused_is_reported(cafile: str) -> None:
    r = probe_sync("mx.good.test", ["127.0.0.1"], _settings(1, cafile))
    assert not r.connected and r.error


def test_prober_uses_dane_for_a_host_with_usable_tlsa_and_caches(
        smtp: SmtpServer, leaf: Issued, fake_dns: FakeDns) -> None:
    dest = _dest(fake_dns, make_tlsa(leaf.der).to_text())
    prober = Prober(_settings(smtp.port, None, cache_ttl=60))

    async def twice() -> None:
        (first,) = await prober.probe_hosts(dest, candidates(dest))
        (second,) = await prober.probe_hosts(dest, candidates(dest))
        assert first.host == "mx.good.test" and first.verification == "dane"
        assert qualifies(first)
        assert not first.cached and second.cached
        verdict = judge(dest, [first])
        assert verdict.deliverable and verdict.probed

    run(twice())


def test_prober_pkix_verdict_for_secure_mx_without_tlsa(smtp: SmtpServer, fake_dns: FakeDns, cafile: str) -> None:
    dest = _dest(fake_dns)
    probes = run(Prober(_settings(smtp.port, cafile)).probe_hosts(dest, candidates(dest)))
    assert [p.verification for p in probes] == ["pkix"]
    assert judge(dest, probes).deliverable
