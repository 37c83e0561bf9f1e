"""Cache backends behind one interface, and single-flight coalescing.

Values are opaque ``bytes`` (the callers store JSON, never pickles: a shared
Redis must not be a way to run code in every MTA).  Every backend failure is
raised as :class:`~requiretls.dest.errors.CacheError`; callers treat it as a
miss and look the answer up afresh, so a broken cache can cost time but can
never weaken an answer.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import sqlite3
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from .errors import CacheError

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
Clock = Callable[[], float]


def evict(data: dict[K, V], limit: int, expired: Callable[[V], bool]) -> None:
    """Make room in a dict used as a bounded cache of ``limit`` entries: expired entries first, then the oldest
    insertions, down to 90% of the limit, so that a full cache runs this once per tenth of the limit in inserts
    instead of on every insert."""
    for k in [k for k, v in data.items() if expired(v)]:
        del data[k]
    target = max(0, int(limit * 0.9) - 1)
    # One pass over the oldest keys (dicts keep insertion order).  Deleting them one by one from the front,
    # each next(iter()) would walk over the slots already emptied: quadratic, 17 s to fill 100,000 destinations.
    for k in list(itertools.islice(data, max(0, len(data) - target))):
        del data[k]


class Cache(abc.ABC):
    """Key/value store with a time-to-live per entry."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or ``None`` when absent or expired."""

    @abc.abstractmethod
    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Store ``value`` for ``ttl`` seconds (``ttl <= 0`` stores nothing)."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Forget ``key``."""

    @abc.abstractmethod
    async def keys(self, prefix: str) -> list[str]:
        """Keys (not expired) that start with ``prefix``; used by proactive refreshers."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or files."""


class MemoryCache(Cache):
    """Process-local dictionary cache (the default), bounded to ``max_entries``.

    Each entry is one ``bytes`` object: the expiry time packed in front of the value, so that an entry costs
    its key, one bytes object and a dict slot (a ``(expiry, value)`` tuple would add ~80 bytes per entry,
    measured: 40 MB per 500,000 entries).  When full, expired entries go first, then the oldest insertions,
    down to 90% of the limit, so that the scan runs once per tenth of the limit in inserts.
    """

    _EXPIRY = struct.Struct("<d")

    def __init__(self, clock: Clock = time.monotonic, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._data: dict[str, bytes] = {}
        self._clock = clock
        self._max = max_entries

    @property
    def max_entries(self) -> int:
        return self._max

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        if self._expiry(item) <= self._clock():
            self._data.pop(key, None)
            return None
        return item[8:]

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        if ttl <= 0:
            return
        if len(self._data) >= self._max and key not in self._data:
            now = self._clock()
            evict(self._data, self._max, lambda item: self._expiry(item) <= now)
        self._data[key] = self._EXPIRY.pack(self._clock() + ttl) + value

    @classmethod
    def _expiry(cls, item: bytes) -> float:
        expires: float = cls._EXPIRY.unpack_from(item)[0]
        return expires

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def keys(self, prefix: str) -> list[str]:
        now = self._clock()
        return [k for k, item in self._data.items() if k.startswith(prefix) and self._expiry(item) > now]


class SQLiteCache(Cache):
    """Persistent cache in one SQLite file (one host; survives restarts).

    Blocking sqlite3 calls run in a worker thread; expiry uses wall-clock time
    because entries outlive the process.
    """

    def __init__(self, path: str | Path, clock: Clock = time.time, timeout: float = 5.0) -> None:
        self.path = str(path)
        self._clock = clock
        self._timeout = timeout
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=self._timeout, check_same_thread=False,
                                   isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS requiretls_cache "
                "(key TEXT PRIMARY KEY, expires REAL NOT NULL, value BLOB NOT NULL)"
            )
            self._conn = conn
        return self._conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def work() -> T:
            with self._lock:
                return fn(self._connect())

        try:
            return await asyncio.to_thread(work)
        except (sqlite3.Error, OSError) as e:
            raise CacheError(f"sqlite {self.path}: {e}") from e

    async def get(self, key: str) -> bytes | None:
        now = self._clock()

        def fn(c: sqlite3.Connection) -> bytes | None:
            row = c.execute("SELECT expires, value FROM requiretls_cache WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            if float(row[0]) <= now:
                c.execute("DELETE FROM requiretls_cache WHERE key = ? AND expires <= ?", (key, now))
                return None
            return bytes(row[1])

        return await self._run(fn)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        if ttl <= 0:
            return
        expires = self._clock() + ttl
        await self._run(lambda c: c.execute(
            "INSERT OR REPLACE INTO requiretls_cache (key, expires, value) VALUES (?, ?, ?)",
            (key, expires, value)))

    async def delete(self, key: str) -> None:
        await self._run(lambda c: c.execute("DELETE FROM requiretls_cache WHERE key = ?", (key,)))

    async def keys(self, prefix: str) -> list[str]:
        now = self._clock()
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

        def fn(c: sqlite3.Connection) -> list[str]:
            rows = c.execute(
                "SELECT key FROM requiretls_cache WHERE key LIKE ? ESCAPE '\\' AND expires > ?",
                (escaped + "%", now)).fetchall()
            return [str(r[0]) for r in rows]

        return await self._run(fn)

    async def purge_expired(self) -> int:
        now = self._clock()
        return await self._run(
            lambda c: c.execute("DELETE FROM requiretls_cache WHERE expires <= ?", (now,)).rowcount)

    async def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class RedisCache(Cache):
    """Cache shared by several MTAs in Redis (``redis.asyncio``; redis-py >= 4.3).

    Keys get ``prefix`` so that one Redis database can serve other programs too.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "requiretls:",
                 timeout: float = 2.0) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as e:  # pragma: no cover - redis is an optional dependency
            raise CacheError("the redis cache backend needs the 'redis' Python package") from e
        self.url = url
        self.prefix = prefix
        self._client: Any = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)

    async def _call(self, coro: Awaitable[T]) -> T:
        try:
            return await coro
        except CacheError:
            raise
        except Exception as e:  # redis raises many classes (ConnectionError, TimeoutError, ResponseError...)
            raise CacheError(f"redis {self.url}: {type(e).__name__}: {e}") from e

    async def get(self, key: str) -> bytes | None:
        value = await self._call(self._client.get(self.prefix + key))
        return None if value is None else bytes(value)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        ms = int(ttl * 1000)
        if ms <= 0:
            return
        await self._call(self._client.set(self.prefix + key, value, px=ms))

    async def delete(self, key: str) -> None:
        await self._call(self._client.delete(self.prefix + key))

    async def keys(self, prefix: str) -> list[str]:
        async def scan() -> list[str]:
            out: list[str] = []
            async for k in self._client.scan_iter(match=_redis_glob_escape(self.prefix + prefix) + "*",
                                                  count=500):
                text = k.decode() if isinstance(k, bytes) else str(k)
                out.append(text[len(self.prefix):])
            return out

        return await self._call(scan())

    async def close(self) -> None:
        try:
            close = getattr(self._client, "aclose", None) or self._client.close
            await close()
        except Exception:
            pass


def _redis_glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class SingleFlight(Generic[T]):
    """Run one coroutine per key at a time; concurrent callers share its result.

    The shared task is shielded, so one cancelled caller does not cancel the
    lookup for the others.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[T]] = {}

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def run(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        task = self._tasks.get(key)
        if task is None:
            async def wrapped() -> T:
                try:
                    return await factory()
                finally:
                    self._tasks.pop(key, None)

            task = asyncio.ensure_future(wrapped())
            self._tasks[key] = task
        return await asyncio.shield(task)


def create_cache(backend: str, *, sqlite_path: str | None = None, redis_url: str | None = None,
                 redis_prefix: str = "requiretls:", max_entries: int = 100_000) -> Cache:
    """Build a backend by name: ``memory`` (holding at most ``max_entries``), ``sqlite`` or ``redis``."""
    if backend == "memory":
        return MemoryCache(max_entries=max_entries)
    if backend == "sqlite":
        if not sqlite_path:
            raise ValueError("the sqlite cache backend needs a file path")
        return SQLiteCache(sqlite_path)
    if backend == "redis":
        return RedisCache(redis_url or "redis://127.0.0.1:6379/0", prefix=redis_prefix)
    raise ValueError(f"unknown cache backend {backend!r} (memory, sqlite, redis)")
