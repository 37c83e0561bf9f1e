"""policyd under hostile clients (issue 17), over a real unix socket: keys that can never be a destination get
PERM at once (no lookup, no TEMP that would defer mail until it expires), idle connections are closed, and the
number of connections is bounded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from requiretls.policy.table import PolicyTable
from requiretls.policy.tlsmap import MAX_DOMAIN, Query, Status, parse_key
from requiretls.policyd import server as server_mod
from requiretls.policyd.metrics import Metrics
from requiretls.policyd.netstring import Decoder, encode
from requiretls.policyd.server import PolicyServer, PolicyService, ServiceSettings

from .fakes import FakeResolver, dane

LONG_KEY = ".".join(["a" * 63] * 4) + "." + "b" * 40  # 296 characters, every label valid (the case)


@pytest.mark.parametrize("key", [LONG_KEY, "a" * 62 + "." + "b" * 62 + "." + "c" * 62 + "." + "d" * 62 + ".ex",  # 254
                                 "127.0.0.1", "192.0.2.1.", ".10.0.0.1", "::1", "2001:db8::1", "a b", "a\x00b"])
def test_keys_that_are_no_domain_are_perm(key: str) -> None:
    a = parse_key(key)
    assert not isinstance(a, Query) and a.status is Status.PERM, (key, a)


@pytest.mark.parametrize("key", ["a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61,  # 253
                                 "[127.0.0.1]", "[2001:db8::1]:25", "1.2.3.4.example", "example.", "x" * 63])
def test_longest_domain_and_bracketed_addresses_are_still_keys(key: str) -> None:
    assert isinstance(parse_key(key), Query), key
    if not key.startswith("["):
        assert len(key.strip(".")) <= MAX_DOMAIN


@contextlib.asynccontextmanager
async def running(path: str, resolver: FakeResolver, idle: float = 300.0) -> AsyncIterator[PolicyServer]:
    service = PolicyService(PolicyTable.parse("", "policy"), resolver, Metrics(),  # type: ignore[arg-type]
                            ServiceSettings(answer_ttl=60, lookup_timeout=5, idle_timeout=idle))
    srv = PolicyServer(service)
    await srv.listen([f"unix:{path}"])
    try:
        yield srv
    finally:
        await srv.shutdown(grace=2)


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> bytes:
    writer.write(encode(req))
    dec = Decoder(10_000)
    while True:
        data = await asyncio.wait_for(reader.read(4096), 5)
        assert data, "connection closed"
        out = dec.feed(data)
        if out:
            return out[0]


def test_long_key_and_bare_ip_get_perm_over_the_socket_without_a_lookup(tmp_path: Path) -> None:
    async def go() -> None:
        resolver = FakeResolver({})
        async with running(str(tmp_path / "p.sock"), resolver):
            r, w = await asyncio.open_unix_connection(str(tmp_path / "p.sock"))
            assert (await _ask(r, w, b"default " + LONG_KEY.encode())).startswith(b"PERM invalid lookup key")
            assert (await _ask(r, w, b"strict 192.0.2.1")).startswith(b"PERM invalid lookup key")
            assert (await _ask(r, w, b"default 192.0.2.1.example")) == b"NOTFOUND "
            w.close()
        assert resolver.calls == ["192.0.2.1.example"]

    asyncio.run(go())


def test_idle_connection_is_closed_but_not_while_an_answer_is_pending(tmp_path: Path) -> None:
    async def go() -> None:
        path = str(tmp_path / "p.sock")
        resolver = FakeResolver({"slow.example": dane("slow.example")}, delay=1.0)
        async with running(path, resolver, idle=0.3) as srv:
            r, w = await asyncio.open_unix_connection(path)
            # A lookup longer than the idle timeout: the answer still comes.
            assert (await _ask(r, w, b"default slow.example")) == b"OK dane-only"
            # Then nothing: closed after about the idle timeout.
            started = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(r.read(100), 5) == b""
            assert asyncio.get_running_loop().time() - started < 2.0
            assert srv.service.metrics._errors.get("idle_timeout") == [1]
            w.close()

    asyncio.run(go())


def test_connections_beyond_the_limit_are_closed_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_mod, "MAX_CONNECTIONS", 3)

    async def go() -> None:
        path = str(tmp_path / "p.sock")
        async with running(path, FakeResolver({})) as srv:
            conns = [await asyncio.open_unix_connection(path) for _ in range(3)]
            for r, w in conns:
                assert (await _ask(r, w, b"default [a.example]")) == b"NOTFOUND "
            r4, w4 = await asyncio.open_unix_connection(path)
            assert await asyncio.wait_for(r4.read(100), 5) == b""
            assert srv.refused == 1
            conns[0][1].close()
            await asyncio.sleep(0.2)
            r5, w5 = await asyncio.open_unix_connection(path)
            assert (await _ask(r5, w5, b"default [a.example]")) == b"NOTFOUND "
            for _, w in [*conns[1:], (r5, w5), (r4, w4)]:
                w.close()

    asyncio.run(go())
