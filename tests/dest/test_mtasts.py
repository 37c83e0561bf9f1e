"""MTA-STS (RFC 8461): record and policy parsing, and the HTTPS fetch against a real local
server with a test CA, for every failure case of section 3.3."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from requiretls.dest.cache import Cache, MemoryCache
from requiretls.dest.dnssec import DnsClient, ResolverSettings
from requiretls.dest.errors import (
    CacheError,
    MtaStsFetchError,
    MtaStsHttpStatusError,
    MtaStsMediaTypeError,
    MtaStsPolicyError,
    MtaStsRecordError,
    MtaStsRedirectError,
    MtaStsTemporaryError,
    MtaStsTimeoutError,
    MtaStsTlsError,
    MtaStsTooLargeError,
)
from requiretls.dest.mtasts import (
    MAX_AGE_LIMIT,
    StsMode,
    StsResolver,
    StsSettings,
    StsStatus,
    parse_policy,
    parse_sts_record,
    select_sts_record,
)

from .support import FakeDns, HttpAnswer, PolicyServer, TestCA, policy_text, run, server_context

# --- TXT record (section 3.1) -----------------------------------------------------------


def test_record_with_id_parses() -> None:
    rec = parse_sts_record("v=STSv1; id=20160831085700Z;")
    assert rec.id == "20160831085700Z"


def test_record_extensions_are_kept_and_whitespace_allowed() -> None:
    rec = parse_sts_record("v=STSv1 ;\tid=abc ; ext_1=value")
    assert rec.id == "abc"
    assert rec.extensions == (("ext_1", "value"),)


@pytest.mark.parametrize("text", [
    "v=STSv1",
    "v=STSv1;",
    "v=STSv1; id=",
    "v=STSv1; id=has-dash",
    "v=STSv1; id=" + "a" * 33,
    "v=STSv10; id=abc",
    "v=STSv1; id=abc; junk",
    "v=STSv1; id=abc;;",
])
def test_invalid_records_are_rejected(text: str) -> None:
    """RFC 8461 section 3.1 ABNF: id is 1-32 ALPHA/DIGIT; fields are key=value."""
    with pytest.raises(MtaStsRecordError):
        parse_sts_record(text)


def test_two_stsv1_records_mean_no_policy() -> None:
    """RFC 8461 section 3.1: if the number of v=STSv1 records is not exactly one, no policy."""
    with pytest.raises(MtaStsRecordError, match="exactly one"):
        select_sts_record(["v=STSv1; id=a", "v=STSv1; id=b"])


def test_non_sts_txt_records_are_discarded() -> None:
    assert select_sts_record(["spf-ish text", "v=STSv1; id=a"]).id == "a"


# --- policy body (section 3.2) --------------------------------------------------------------


def test_policy_parses_fields_with_crlf_and_lf() -> None:
    p = parse_policy("version: STSv1\r\nmode: enforce\nmx: mx1.good.test\nmx: *.backup.good.test\r\n"
                     "max_age: 86400\n")
    assert p.mode is StsMode.ENFORCE
    assert p.mx == ("mx1.good.test", "*.backup.good.test")
    assert p.max_age == 86400


def test_policy_first_duplicate_key_counts_and_unknown_keys_are_ignored() -> None:
    """RFC 8461 section 3.2: only the first of a repeated non-mx field is used."""
    p = parse_policy("version: STSv1\nmode: testing\nmode: enforce\nmax_age: 5\nfoo: bar\nmx: a.test\n")
    assert p.mode is StsMode.TESTING


def test_policy_max_age_is_capped() -> None:
    """RFC 8461 section 3.2: max_age is at most 31557600."""
    p = parse_policy("version: STSv1\nmode: enforce\nmax_age: 9999999999\nmx: a.test\n")
    assert p.max_age == MAX_AGE_LIMIT


def test_policy_mode_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 10\n").mx == ()


@pytest.mark.parametrize("text", [
    "mode: enforce\nmax_age: 10\nmx: a.test\n",  # no version
    "version: STSv2\nmode: enforce\nmax_age: 10\nmx: a.test\n",
    "version: STSv1\nmode: Enforce\nmax_age: 10\nmx: a.test\n",  # values are case-sensitive
    "version: STSv1\nmode: enforce\nmax_age: -1\nmx: a.test\n",
    "version: STSv1\nmode: enforce\nmax_age: 12345678901\nmx: a.test\n",  # more than 10 digits
    "version: STSv1\nmode: enforce\nmax_age: 10\n",  # enforce without mx
    "version: STSv1\nmode: enforce\nmax_age: 10\nmx: mx.*.test\n",  # wildcard not left-most
    "version: STSv1\nmode: enforce\nmax_age: 10\nmx: *mx.test\n",  # partial-label wildcard
    "Version: STSv1\nmode: enforce\nmax_age: 10\nmx: a.test\n",  # keys are case-sensitive
    "version STSv1\n",
])
def test_invalid_policies_are_rejected(text: str) -> None:
    with pytest.raises(MtaStsPolicyError):
        parse_policy(text)


def test_mx_pattern_wildcard_matches_exactly_one_left_most_label() -> None:
    """RFC 8461 section 4.1: *.example.com matches mail.example.com, not example.com or a.b.example.com."""
    p = parse_policy("version: STSv1\nmode: enforce\nmax_age: 10\nmx: *.good.test\nmx: exact.test\n")
    assert p.matches("mx.good.test")
    assert not p.matches("good.test")
    assert not p.matches("a.mx.good.test")
    assert p.matches("EXACT.test.")
    assert not p.matches("sub.exact.test")


# --- fetch against a real HTTPS server (section 3.3) ---------------------------------------


def _resolver(fake_dns: FakeDns, server: PolicyServer, cafile: str, cache: Cache | None = None,
              clock: list[float] | None = None, **kw: float) -> StsResolver:
    dns_client = DnsClient(ResolverSettings(address="127.0.0.1", port=fake_dns.port, timeout=0.5, attempts=1))
    settings = StsSettings(cafile=cafile, https_port=server.port, fetch_timeout=kw.pop("fetch_timeout", 3.0), **kw)
    now = clock if clock is not None else [1_000_000.0]
    return StsResolver(dns_client, settings, cache if cache is not None else MemoryCache(), clock=lambda: now[0])


def _publish(fake_dns: FakeDns, server: PolicyServer, domain: str, answer: HttpAnswer | None = None,
             record_id: str = "id1") -> None:
    fake_dns.add(f"_mta-sts.{domain}", "TXT", f'"v=STSv1; id={record_id};"', ad=False)
    fake_dns.host(f"mta-sts.{domain}", ad=False)
    server.answers[f"mta-sts.{domain}"] = answer or HttpAnswer(body=policy_text(mx=(f"mx.{domain}",)))


def test_fetch_valid_policy(fake_dns: FakeDns, policy_server: PolicyServer, cafile: str) -> None:
    _publish(fake_dns, policy_server, "good.test")
    res = run(_resolver(fake_dns, policy_server, cafile).resolve("good.test"))
    assert res.status is StsStatus.FETCHED
    assert res.policy is not None and res.policy.mode is StsMode.ENFORCE
    assert res.policy.policy_id == "id1"
    assert res.policy.matches("mx.good.test")
    assert not res.policy.matches("mx.evil.test")
    assert policy_server.requests == [("mta-sts.good.test", "/.well-known/mta-sts.txt")]


def test_chunked_policy_and_body_without_length_are_read(fake_dns: FakeDns, policy_server: PolicyServer,
                                                         cafile: str) -> None:
    _publish(fake_dns, policy_server, "chunked.test", HttpAnswer(body=policy_text(), chunked=True))
    _publish(fake_dns, policy_server, "nolen.test", HttpAnswer(body=policy_text(), no_length=True))
    r = _resolver(fake_dns, policy_server, cafile)

    async def both() -> None:
        assert (await r.resolve("chunked.test")).status is StsStatus.FETCHED
        assert (await r.resolve("nolen.test")).status is StsStatus.FETCHED

    run(both())


@pytest.mark.parametrize(("answer", "error"), [
    (HttpAnswer(301, b"", headers=[("Location", "https://mta-sts.good.test/.well-known/mta-sts.txt")]),
     MtaStsRedirectError),
    (HttpAnswer(302, b"moved", headers=[("Location", "https://elsewhere.test/")]), MtaStsRedirectError),
    (HttpAnswer(404, b"nope"), MtaStsHttpStatusError),
    (HttpAnswer(body=policy_text(), content_type="text/html"), MtaStsMediaTypeError),
    (HttpAnswer(body=policy_text(), content_type=None), MtaStsMediaTypeError),
    (HttpAnswer(body=policy_text() + b"#" * 70000), MtaStsTooLargeError),
    (HttpAnswer(body=policy_text() + b"#" * 70000, chunked=True), MtaStsTooLargeError),
    (HttpAnswer(body=policy_text() + b"#" * 70000, no_length=True), MtaStsTooLargeError),
    (HttpAnswer(body=b"version: STSv1\nmode: bogus\n"), MtaStsPolicyError),
])
def test_each_fetch_failure_is_a_specific_error(fake_dns: FakeDns, policy_server: PolicyServer, cafile: str,
                                                answer: HttpAnswer, error: type[Exception]) -> None:
    """RFC 8461 section 3.3: only 200, no redirects, text/plain, size cap (64 KiB), valid policy."""
    _publish(fake_dns, policy_server, "good.test", answer)
    r = _resolver(fake_dns, policy_server, cafile)
    with pytest.raises(error):
        run(r.fetch("good.test", "id1"))


def test_redirect_is_not_followed(fake_dns: FakeDns, policy_server: PolicyServer, cafile: str) -> None:
    """RFC 8461 section 3.3: 3xx MUST NOT be followed; the target is never requested."""
    _publish(fake_dns, policy_server, "redirect.test",
             HttpAnswer(301, headers=[("Location", "https://mta-sts.good.test/.well-known/mta-sts.txt")]))
    _publish(fake_dns, policy_server, "good.test")
    res = run(_resolver(fake_dns, policy_server, cafile).resolve("redirect.test"))
    assert res.status is StsStatus.FETCH_FAILED
    assert res.policy is None
    assert "Redirect" in res.detail
    assert [h for h, _ in policy_server.requests] == ["mta-sts.redirect.test"]


def test_certificate_for_another_name_is_rejected(fake_dns: FakeDns, policy_server: PolicyServer,
                                                 cafile: str) -> None:
    """RFC 8461 section 3.3: the certificate must be valid for mta-sts.DOMAIN (not in the SAN list)."""
    _publish(fake_dns, policy_server, "wrongname.test")
    with pytest.raises(MtaStsTlsError, match="certificate"):
        run(_resolver(fake_dns, policy_server, cafile).fetch("wrongname.test", "id1"))


def test_certificate_from_untrusted_ca_is_rejected(fake_dns: FakeDns, policy_server: PolicyServer,
                                                   tmp_path: Path) -> None:
    other = TestCA("some other root")
    _publish(fake_dns, policy_server, "good.test")
    with pytest.raises(MtaStsTlsError):
        run(_resolver(fake_dns, policy_server, other.write_root(tmp_path / "other.pem")).fetch("good.test", "x"))


def test_expired_certificate_is_rejected(fake_dns: FakeDns, policy_server: PolicyServer, ca: TestCA,
                                         cafile: str, tmp_path: Path) -> None:
    _publish(fake_dns, policy_server, "expired.test")
    policy_server.contexts["mta-sts.expired.test"] = server_context(
        tmp_path, ca.leaf("mta-sts.expired.test", expired=True))
    with pytest.raises(MtaStsTlsError, match="expired"):
        run(_resolver(fake_dns, policy_server, cafile).fetch("expired.test", "id1"))


def test_sni_selects_the_right_certificate(fake_dns: FakeDns, policy_server: PolicyServer, ca: TestCA,
                                           cafile: str, tmp_path: Path) -> None:
    """RFC 8461 section 3.3: SNI is mta-sts.DOMAIN; a server that needs it must get it."""
    _publish(fake_dns, policy_server, "sni.test")
    policy_server.contexts["mta-sts.sni.test"] = server_context(tmp_path, ca.leaf("mta-sts.sni.test"))
    res = run(_resolver(fake_dns, policy_server, cafile).resolve("sni.test"))
    assert res.status is StsStatus.FETCHED


def test_fetch_timeout(fake_dns: FakeDns, policy_server: PolicyServer, cafile: str) -> None:
    _publish(fake_dns, policy_server, "slow.test", HttpAnswer(body=policy_text(), delay=2.0))
    with pytest.raises(MtaStsTimeoutError):
        run(_resolver(fake_dns, policy_server, cafile, fetch_timeout=0.5).fetch("slow.test", "id1"))


def test_connection_refused_is_a_fetch_error(fake_dns: FakeDns, policy_server: PolicyServer, cafile: str) -> None:
    _publish(fake_dns, policy_server, "good.test")
    fake_dns.host("mta-sts.good.test", "127.0.0.254")
    r = _resolver(fake_dns, policy_server, cafile)
    object.__setattr__(r, "settings", StsSettings(cafile=cafile, https_port=1, fetch_timeout=2))
    with pytest.raises(MtaStsFetchError):
        run(r.fetch("good.test", "id1"))


def test_two_stsv1_txt_records_mean_no_policy_and_no_fetch(fake_dns: FakeDns, policy_server: PolicyServer,
                                                           cafile: str) -> None:
    """RFC 8461 section 3.1: two v=STSv1 records: assume no policy."""
    _publish(fake_dns, policy_server, "good.test")
    fake_dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; id=other"', ad=False)
    res = run(_resolver(fake_dns, policy_server, cafile).resolve("good.test"))
    assert res.status is StsStatus.RECORD_INVALID
    assert res.policy is None
    assert policy_server.requests == []


def test_fetch_failure_without_cached_policy_means_no_policy(fake_dns: FakeDns, policy_server: PolicyServer,
                                                             cafile: str) -> None:
    """RFC 8461 section 3.3: valid TXT, fetch fails, nothing cached: deliver as if no MTA-STS."""
    _publish(fake_dns, policy_server, "good.test", HttpAnswer(500, b"oops"))
    res = run(_resolver(fake_dns, policy_server, cafile).resolve("good.test"))
    assert res.status is StsStatus.FETCH_FAILED
    assert res.policy is None
    assert res.record_id == "id1"


def test_fetch_failure_with_cached_policy_applies_the_cached_policy(
        fake_dns: FakeDns, policy_server: PolicyServer, cafile: str, cache_backend: Cache) -> None:
    """RFC 8461 section 3.3 / 5.1: no live policy but a valid cached one: apply the cached one."""
    _publish(fake_dns, policy_server, "good.test")
    r = _resolver(fake_dns, policy_server, cafile, cache_backend)

    async def scenario() -> None:
        first = await r.resolve("good.test")
        assert first.status is StsStatus.FETCHED
        fake_dns.replies.pop(("_mta-sts.good.test", "TXT"))
        _publish(fake_dns, policy_server, "good.test", HttpAnswer(500), record_id="id2")
        if not isinstance(cache_backend, MemoryCache):
            r.store._local.clear()  # the persistent backend alone must carry the policy
        else:  # with the memory backend the in-memory copy is the only copy (no duplicate in the cache)
            assert await cache_backend.keys("sts:") == []
        r.dns.cache = MemoryCache()  # forget the DNS answers (their TTL would hide the new id)
        second = await r.resolve("good.test")
        assert second.status is StsStatus.CACHED_FETCH_FAILED
        assert second.policy == first.policy
        assert second.record_id == "id2"

    run(scenario())


def test_cached_policy_is_used_while_txt_id_is_unchanged(fake_dns: FakeDns, policy_server: PolicyServer,
                                                         cafile: str, cache_backend: Cache) -> None:
    _publish(fake_dns, policy_server, "good.test")
    r = _resolver(fake_dns, policy_server, cafile, cache_backend)

    async def scenario() -> None:
        await r.resolve("good.test")
        again = await r.resolve("good.test")
        assert again.status is StsStatus.CACHED

    run(scenario())
    assert len(policy_server.requests) == 1


def test_new_txt_id_triggers_a_refetch(fake_dns: FakeDns, policy_server: PolicyServer, cafile: str,
                                       cache_backend: Cache) -> None:
    """RFC 8461 section 3.3 / 10.2: a changed id means a new policy must be fetched."""
    _publish(fake_dns, policy_server, "good.test")
    r = _resolver(fake_dns, policy_server, cafile, cache_backend)

    async def scenario() -> None:
        await r.resolve("good.test")
        fake_dns.replies.pop(("_mta-sts.good.test", "TXT"))
        _publish(fake_dns, policy_server, "good.test",
                 HttpAnswer(body=policy_text(mode="testing", mx=("mx2.good.test",))), record_id="id2")
        r.dns.cache = MemoryCache()
        res = await r.resolve("good.test")
        assert res.status is StsStatus.FETCHED
        assert res.policy is not None and res.policy.mode is StsMode.TESTING
        assert res.policy.policy_id == "id2"

    run(scenario())
    assert len(policy_server.requests) == 2


def test_removed_txt_record_does_not_flush_the_cached_policy(fake_dns: FakeDns, policy_server: PolicyServer,
                                                             cafile: str) -> None:
    """RFC 8461 section 3.1: an absent or invalid TXT record does not invalidate a cached policy."""
    _publish(fake_dns, policy_server, "good.test")
    r = _resolver(fake_dns, policy_server, cafile)

    async def scenario() -> None:
        await r.resolve("good.test")
        fake_dns.nxdomain("_mta-sts.good.test", "TXT", ad=False)
        r.dns.cache = MemoryCache()
        res = await r.resolve("good.test")
        assert res.status is StsStatus.CACHED_NO_RECORD
        assert res.policy is not None

    run(scenario())


def test_expired_cached_policy_is_not_applied(fake_dns: FakeDns, policy_server: PolicyServer,
                                              cafile: str) -> None:
    clock = [1_000_000.0]
    _publish(fake_dns, policy_server, "good.test", HttpAnswer(body=policy_text(max_age=100)))
    r = _resolver(fake_dns, policy_server, cafile, clock=clock)

    async def scenario() -> None:
        await r.resolve("good.test")
        fake_dns.nxdomain("_mta-sts.good.test", "TXT", ad=False)
        r.dns.cache = MemoryCache()
        clock[0] += 101
        res = await r.resolve("good.test")
        assert res.policy is None
        assert res.status is StsStatus.NO_RECORD

    run(scenario())


def test_failed_fetch_is_not_retried_within_the_retry_interval(
        fake_dns: FakeDns, policy_server: PolicyServer, cafile: str) -> None:
    """RFC 8461 section 3.3: wait (suggested 5 minutes) before retrying a failed fetch of one id."""
    _publish(fake_dns, policy_server, "good.test", HttpAnswer(500))
    r = _resolver(fake_dns, policy_server, cafile)

    async def scenario() -> None:
        await r.resolve("good.test")
        res = await r.resolve("good.test")
        assert res.status is StsStatus.FETCH_FAILED

    run(scenario())
    assert len(policy_server.requests) == 1


def test_proactive_refresh_before_expiry(fake_dns: FakeDns, policy_server: PolicyServer, cafile: str,
                                         cache_backend: Cache) -> None:
    """RFC 8461 section 3.3 / 10.2: refresh cached policies before they expire, even with the same id."""
    clock = [1_000_000.0]
    _publish(fake_dns, policy_server, "good.test", HttpAnswer(body=policy_text(max_age=7200)))
    r = _resolver(fake_dns, policy_server, cafile, cache_backend, clock=clock)

    async def scenario() -> None:
        first = await r.resolve("good.test")
        assert first.policy is not None
        clock[0] += 3700  # within refresh_margin (3600 s) of expiry
        res = await r.resolve("good.test")
        assert res.status is StsStatus.CACHED
        await r.wait_background()
        refreshed = await r.resolve("good.test")
        assert refreshed.policy is not None
        assert refreshed.policy.fetched_at == clock[0]
        clock[0] += 3700
        assert await r.refresh_all() == 1

    run(scenario())
    assert len(policy_server.requests) == 3


def test_concurrent_resolves_fetch_once(fake_dns: FakeDns, policy_server: PolicyServer, cafile: str) -> None:
    _publish(fake_dns, policy_server, "good.test")
    r = _resolver(fake_dns, policy_server, cafile)

    async def many() -> None:
        results = await asyncio.gather(*(r.resolve("good.test") for _ in range(8)))
        assert all(x.policy is not None for x in results)

    run(many())
    assert len(policy_server.requests) == 1


class _BrokenCache(MemoryCache):
    async def get(self, key: str) -> bytes | None:
        raise CacheError("down")

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        raise CacheError("down")


def test_unreadable_cache_and_failed_fetch_defer_instead_of_downgrading(
        fake_dns: FakeDns, policy_server: PolicyServer, cafile: str) -> None:
    """A cache failure must never weaken the answer: a policy may be cached where we cannot see it."""
    _publish(fake_dns, policy_server, "good.test", HttpAnswer(500))
    r = _resolver(fake_dns, policy_server, cafile, _BrokenCache())
    with pytest.raises(MtaStsTemporaryError):
        run(r.resolve("good.test"))


def test_unreadable_cache_still_fetches_a_fresh_policy(fake_dns: FakeDns, policy_server: PolicyServer,
                                                       cafile: str) -> None:
    _publish(fake_dns, policy_server, "good.test")
    res = run(_resolver(fake_dns, policy_server, cafile, _BrokenCache()).resolve("good.test"))
    assert res.status is StsStatus.FETCHED
