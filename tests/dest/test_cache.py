"""One behaviour suite for every cache backend (memory, SQLite, Redis), and single-flight."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from requiretls.dest.cache import Cache, MemoryCache, RedisCache, SingleFlight, SQLiteCache, create_cache
from requiretls.dest.errors import CacheError

from .support import run


def test_set_then_get_returns_the_value(cache_backend: Cache) -> None:
    async def scenario() -> None:
        assert await cache_backend.get("k") is None
        await cache_backend.set("k", b"\x00value", 30)
        assert await cache_backend.get("k") == b"\x00value"
        await cache_backend.set("k", b"new", 30)
        assert await cache_backend.get("k") == b"new"

    run(scenario())


def test_entries_expire_after_their_ttl(cache_backend: Cache) -> None:
    async def scenario() -> None:
        await cache_backend.set("short", b"x", 0.3)
        await cache_backend.set("long", b"y", 30)
        await asyncio.sleep(0.5)
        assert await cache_backend.get("short") is None
        assert await cache_backend.get("long") == b"y"

    run(scenario())


def test_zero_ttl_stores_nothing(cache_backend: Cache) -> None:
    async def scenario() -> None:
        await cache_backend.set("k", b"x", 0)
        assert await cache_backend.get("k") is None

    run(scenario())


def test_delete_forgets_a_key(cache_backend: Cache) -> None:
    async def scenario() -> None:
        await cache_backend.set("k", b"x", 30)
        await cache_backend.delete("k")
        assert await cache_backend.get("k") is None
        await cache_backend.delete("never-there")

    run(scenario())


def test_keys_lists_live_keys_by_prefix(cache_backend: Cache) -> None:
    async def scenario() -> None:
        await cache_backend.set("sts:a.test", b"1", 30)
        await cache_backend.set("sts:b_%*.test", b"1", 30)
        await cache_backend.set("dns:a.test:MX", b"1", 30)
        await cache_backend.set("sts:gone.test", b"1", 0.2)
        await asyncio.sleep(0.4)
        assert sorted(await cache_backend.keys("sts:")) == ["sts:a.test", "sts:b_%*.test"]
        assert await cache_backend.keys("sts:b_%") == ["sts:b_%*.test"]

    run(scenario())


def test_sqlite_cache_persists_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"

    async def scenario() -> None:
        a = SQLiteCache(path)
        await a.set("k", b"v", 60)
        await a.close()
        b = SQLiteCache(path)
        assert await b.get("k") == b"v"
        await b.close()

    run(scenario())


def test_sqlite_failure_is_a_cache_error(tmp_path: Path) -> None:
    cache = SQLiteCache(tmp_path / "missing-dir" / "c.sqlite")
    with pytest.raises(CacheError):
        run(cache.get("k"))


def test_unreachable_redis_is_a_cache_error() -> None:
    cache = RedisCache("redis://127.0.0.1:1/0", timeout=0.5)
    with pytest.raises(CacheError):
        run(cache.get("k"))


def test_create_cache_by_name(tmp_path: Path) -> None:
    assert type(create_cache("memory")).__name__ == "MemoryCache"
    assert isinstance(create_cache("sqlite", sqlite_path=str(tmp_path / "x.db")), SQLiteCache)
    with pytest.raises(ValueError):
        create_cache("sqlite")
    with pytest.raises(ValueError):
        create_cache("memcached")


def test_single_flight_runs_one_coroutine_per_key() -> None:
    calls = 0

    async def work() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return calls

    async def scenario() -> None:
        flight: SingleFlight[int] = SingleFlight()
        results = await asyncio.gather(*(flight.run("k", work) for _ in range(5)), flight.run("other", work))
        assert results[:5] == [results[0]] * 5
        assert flight.in_flight == 0

    run(scenario())
    assert calls == 2


def test_single_flight_shares_exceptions_and_survives_a_cancelled_waiter() -> None:
    async def boom() -> int:
        await asyncio.sleep(0.05)
        raise RuntimeError("boom")

    async def scenario() -> None:
        flight: SingleFlight[int] = SingleFlight()
        first = asyncio.ensure_future(flight.run("k", boom))
        second = asyncio.ensure_future(flight.run("k", boom))
        await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(RuntimeError, match="boom"):
            await second

    run(scenario())


def test_memory_cache_stays_within_max_entries_dropping_expired_then_oldest() -> None:
    now = [1000.0]
    cache = MemoryCache(clock=lambda: now[0], max_entries=10)

    async def scenario() -> None:
        await cache.set("short", b"s", 5)
        for i in range(9):
            await cache.set(f"k{i}", b"v%d" % i, 100)
        assert len(cache) == 10
        now[0] += 10  # "short" has expired; the cache is full
        await cache.set("new", b"n", 100)
        assert len(cache) <= 10
        assert await cache.get("short") is None
        assert await cache.get("new") == b"n"
        assert await cache.get("k8") == b"v8"  # the newest survive
        for i in range(100):
            await cache.set(f"m{i}", b"x", 100)
            assert len(cache) <= 10
        assert await cache.get("m99") == b"x"
        assert await cache.get("k0") is None  # the oldest went first
        await cache.set("m99", b"again", 100)  # replacing a key evicts nothing
        assert await cache.get("m99") == b"again"

    run(scenario())


def test_memory_cache_rejects_a_useless_limit() -> None:
    with pytest.raises(ValueError):
        MemoryCache(max_entries=0)
    assert create_cache("memory", max_entries=7).max_entries == 7  # type: ignore[attr-defined]
