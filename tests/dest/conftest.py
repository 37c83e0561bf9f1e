"""Fixtures for the dest tests: local DNS answer source, test CA, HTTPS policy server,
Redis on a loopback port, and the cache backends."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from requiretls.dest.cache import Cache, MemoryCache, RedisCache, SQLiteCache
from requiretls.dest.dnssec import DnsClient, ResolverSettings

from .support import FakeDns, PolicyServer, TestCA, run, server_context


@pytest.fixture
def fake_dns() -> Iterator[FakeDns]:
    server = FakeDns()
    yield server
    server.close()


@pytest.fixture
def dns_settings(fake_dns: FakeDns) -> ResolverSettings:
    return ResolverSettings(address="127.0.0.1", port=fake_dns.port, timeout=0.5, attempts=1)


@pytest.fixture
def dns_client(dns_settings: ResolverSettings) -> DnsClient:
    return DnsClient(dns_settings)


@pytest.fixture(scope="session")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def cafile(ca: TestCA, tmp_path: Path) -> str:
    return ca.write_root(tmp_path / "root.pem")


@pytest.fixture
def policy_server(ca: TestCA, tmp_path: Path) -> Iterator[PolicyServer]:
    """HTTPS server whose default certificate covers mta-sts.{good,other,big,...}.test."""
    names = tuple(f"mta-sts.{d}.test" for d in ("good", "redirect", "big", "chunked", "nolen", "media",
                                                "notfound", "slow", "garbage", "mixed", "insecure",
                                                "dane", "testing", "nonemode"))
    leaf = ca.leaf(*names)
    srv = PolicyServer(server_context(tmp_path, leaf))
    yield srv
    srv.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on 127.0.0.1 (never the system service)."""
    exe = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists()
                                           else None)
    if exe is None:
        pytest.skip("redis-server is not installed (Debian package redis-server); Redis backend not tested")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--daemonize", "no", "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def cache_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cache]:
    """Each cache backend in turn; the Redis one gets a unique key prefix per test."""
    backend: Cache
    if request.param == "memory":
        backend = MemoryCache()
    elif request.param == "sqlite":
        backend = SQLiteCache(tmp_path / "cache.sqlite")
    else:
        url = request.getfixturevalue("redis_url")
        backend = RedisCache(url, prefix=f"t{time.monotonic_ns()}:")
    yield backend
    run(backend.close())
