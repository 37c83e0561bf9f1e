"""The one MTA-STS policy store (RFC 8461 section 5.1): a policy stays applicable for its ``max_age`` whatever
happens to the cache backend (eviction, an outage, a damaged entry), and nothing is stored twice in memory."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from requiretls.dest.cache import Cache, MemoryCache, SQLiteCache
from requiretls.dest.dnssec import DnsClient
from requiretls.dest.errors import CacheError
from requiretls.dest.mtasts import StsResolver, StsSettings, StsStatus
from requiretls.dest.mtasts.store import PolicyStore
from requiretls.facts import StsMode, StsPolicy

from .support import FakeDns, HttpAnswer, PolicyServer, policy_text, run

T0 = 1_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FlakyCache(Cache):
    """A shared backend (not the in-process memory one) that can be switched off, like Redis going away."""

    def __init__(self) -> None:
        self.inner = MemoryCache(max_entries=1000)
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise CacheError("redis: connection refused")

    async def get(self, key: str) -> bytes | None:
        self._check()
        return await self.inner.get(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._check()
        await self.inner.set(key, value, ttl)

    async def delete(self, key: str) -> None:
        self._check()
        await self.inner.delete(key)

    async def keys(self, prefix: str) -> list[str]:
        self._check()
        return await self.inner.keys(prefix)


def _policy(max_age: int = 3600, fetched_at: float = T0, policy_id: str = "1", mx: str = "mx.a.test") -> StsPolicy:
    return StsPolicy(StsMode.ENFORCE, max_age, (mx,), policy_id, fetched_at)


def test_memory_backend_policy_outlives_cache_eviction_for_its_max_age() -> None:
    """RFC 8461 section 5.1: a policy is applied until max_age ends; a full, evicting cache must not drop it."""
    clock = Clock()
    cache = MemoryCache(clock=clock, max_entries=2)
    store = PolicyStore(cache, clock)

    async def scenario() -> None:
        await store.put("a.test", _policy())
        for i in range(50):  # fill the bounded cache many times over
            await store.remember_failure(f"d{i}.test", "1", "boom", 300)
        assert len(cache) <= 2
        clock.now = T0 + 3599
        assert (await store.get("a.test")).policy == _policy()
        clock.now = T0 + 3600
        assert (await store.get("a.test")).policy is None
        assert len(store) == 0

    run(scenario())


def test_memory_backend_keeps_one_copy_only() -> None:
    """The per-process map is the store: the bounded memory cache holds no policy (no second copy)."""
    clock = Clock()
    cache = MemoryCache(clock=clock)
    store = PolicyStore(cache, clock)

    async def scenario() -> None:
        await store.put("a.test", _policy())
        assert await cache.keys("sts:") == []
        assert len(store) == 1

    run(scenario())


def test_shared_backend_outage_does_not_hide_a_known_policy() -> None:
    clock = Clock()
    cache = FlakyCache()
    store = PolicyStore(cache, clock)

    async def scenario() -> None:
        await store.put("a.test", _policy())
        assert await cache.inner.get("sts:a.test") is not None  # written through
        cache.down = True
        loaded = await store.get("a.test")
        assert loaded.policy == _policy()
        assert loaded.readable is False

    run(scenario())


def test_shared_backend_eviction_or_flush_does_not_hide_a_known_policy() -> None:
    clock = Clock()
    cache = FlakyCache()
    store = PolicyStore(cache, clock)

    async def scenario() -> None:
        await store.put("a.test", _policy())
        await cache.inner.delete("sts:a.test")
        loaded = await store.get("a.test")
        assert loaded.policy == _policy()
        assert loaded.readable is True

    run(scenario())


def test_failed_write_to_the_shared_backend_keeps_the_policy_in_this_process() -> None:
    clock = Clock()
    cache = FlakyCache()
    store = PolicyStore(cache, clock)

    async def scenario() -> None:
        await store.put("a.test", _policy(fetched_at=T0 - 10, policy_id="old"))
        cache.down = True
        await store.put("a.test", _policy(policy_id="new"))
        cache.down = False  # back, with the older entry: the later fetch wins
        assert (await store.get("a.test")).policy == _policy(policy_id="new")

    run(scenario())


def test_newer_policy_from_another_mta_wins_and_becomes_the_fallback() -> None:
    clock = Clock()
    cache = FlakyCache()
    mine, theirs = PolicyStore(cache, clock), PolicyStore(cache, clock)

    async def scenario() -> None:
        await mine.put("a.test", _policy(policy_id="old"))
        clock.now += 60
        await theirs.put("a.test", _policy(fetched_at=clock.now, policy_id="new"))
        assert (await mine.get("a.test")).policy == _policy(fetched_at=clock.now, policy_id="new")
        cache.down = True
        assert (await mine.get("a.test")).policy == _policy(fetched_at=clock.now, policy_id="new")

    run(scenario())


def test_damaged_backend_entry_falls_back_to_the_local_copy() -> None:
    clock = Clock()
    cache = FlakyCache()
    store = PolicyStore(cache, clock)

    async def scenario() -> None:
        await store.put("a.test", _policy())
        await cache.inner.set("sts:a.test", b"{not json", 100)
        assert (await store.get("a.test")).policy == _policy()
        await cache.inner.set("sts:a.test", json.dumps({"mode": "enforce"}).encode(), 100)
        assert (await store.get("a.test")).policy == _policy()

    run(scenario())


def test_sqlite_backend_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        first = SQLiteCache(tmp_path / "c.db", clock=clock)
        await PolicyStore(first, clock).put("a.test", _policy())
        await first.close()
        second = SQLiteCache(tmp_path / "c.db", clock=clock)
        restarted = PolicyStore(second, clock)
        assert (await restarted.get("a.test")).policy == _policy()
        assert await restarted.domains() == {"a.test"}
        await second.close()

    run(scenario())


def test_domains_lists_both_copies_and_forgets_expired_policies() -> None:
    clock = Clock()
    cache = FlakyCache()
    store, other = PolicyStore(cache, clock), PolicyStore(cache, clock)

    async def scenario() -> None:
        await store.put("short.test", _policy(max_age=10))
        await store.put("long.test", _policy())
        await other.put("theirs.test", _policy())
        assert await store.domains() == {"short.test", "long.test", "theirs.test"}
        clock.now += 11
        cache.down = True
        assert await store.domains() == {"long.test"}

    run(scenario())


def test_resolver_applies_the_known_policy_during_a_backend_outage(
        fake_dns: FakeDns, policy_server: PolicyServer, cafile: str, dns_client: DnsClient) -> None:
    """A Redis outage after the fetch: the policy is still applied (CACHED) and not fetched again."""
    fake_dns.add("_mta-sts.good.test", "TXT", '"v=STSv1; id=id1;"', ad=False)
    fake_dns.host("mta-sts.good.test", ad=False)
    policy_server.answers["mta-sts.good.test"] = HttpAnswer(body=policy_text())
    cache = FlakyCache()
    r = StsResolver(dns_client, StsSettings(cafile=cafile, https_port=policy_server.port), cache)

    async def scenario() -> None:
        first = await r.resolve("good.test")
        assert first.status is StsStatus.FETCHED
        cache.down = True
        again = await r.resolve("good.test")
        assert again.status is StsStatus.CACHED
        assert again.policy == first.policy

    run(scenario())
    assert len(policy_server.requests) == 1


def test_concurrent_reads_during_an_outage_all_see_the_policy() -> None:
    clock = Clock()
    cache = FlakyCache()
    store = PolicyStore(cache, clock)

    async def scenario() -> None:
        await store.put("a.test", _policy())
        cache.down = True
        results = await asyncio.gather(*(store.get("a.test") for _ in range(20)))
        assert all(x.policy == _policy() for x in results)

    run(scenario())
