"""policyd over a real unix socket: table-driven replies, replayed with several read sizes, and bad input."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from requiretls.dest.mtasts import StsMode
from requiretls.policy.table import PolicyTable
from requiretls.policyd.metrics import Metrics
from requiretls.policyd.netstring import Decoder, encode
from requiretls.policyd.server import PolicyServer, PolicyService, ServiceSettings
from tests.testbed.procs import accepts_unix

from .fakes import FakeResolver, dane, deferred, plain, sts

TABLE = """\
bank.example        dane-only   optout=no
partner.example     optout=no
strictpartner.example  secure match=nexthop optout=no
news.example        may
.gov.example        secure      requiretls=yes
internal.example    requiretls=no
[relay.example]:587 encrypt
"""
DESTS = {
    "dane.example": dane("dane.example"),
    "mixed.example": dane("mixed.example", all_tlsa=False),
    "sts.example": sts("sts.example"),
    "ststest.example": sts("ststest.example", StsMode.TESTING),
    # RFC 8461 section 4.1: *.backup.wild.example allows a.backup.wild.example, not x.y.backup.wild.example.
    "wild.example": sts("wild.example", mx=("x.y.backup.wild.example", "a.backup.wild.example")),
    "deep.example": sts("deep.example", mx=("x.y.backup.deep.example",)),
    "partner.example": dane("partner.example"),
    "signed.example": plain("signed.example", secure=True),
    "bogus.example": deferred("bogus.example"),
    "broken.example": RuntimeError("resolver exploded"),
}

# (request, expected reply) -- the table of the acceptance criterion.
CASES = [
    (b"default bank.example", b"OK dane-only"),
    (b"default news.example", b"OK may"),
    (b"default agency.gov.example", b"OK secure"),
    (b"default dane.example", b"OK dane-only"),
    (b"default mixed.example", b"OK dane"),
    # MX patterns exactly: the exact name as published, the wildcard as the current MX hosts it matches.
    (b"default sts.example", b"OK secure match=mx.sts.example servername=hostname"),
    (b"default wild.example", b"OK secure match=mx.wild.example:a.backup.wild.example servername=hostname"),
    # x.y.backup.deep.example is two labels below the wildcard: not in the list, its certificate is refused.
    (b"default deep.example", b"OK secure match=mx.deep.example servername=hostname"),
    # Postfix 3.10+ (the map name postfix-config writes for it): the TLSRPT attributes.
    (b"default+tlsrpt sts.example", b"OK secure match=mx.sts.example servername=hostname policy_type=sts "
     b"policy_domain=sts.example mx_host_pattern=mx.sts.example mx_host_pattern=*.backup.sts.example "
     b"{ policy_string = version: STSv1 } { policy_string = mode: enforce } { policy_string = mx: mx.sts.example }"
     b" { policy_string = mx: *.backup.sts.example } { policy_string = max_age: 86400 }"),
    (b"default+tlsrpt dane.example", b"OK dane-only"),
    (b"relaxed+tlsrpt news.example", b"OK may"),
    (b"requiretls+tlsrpt dane.example", b"OK enforce"),
    (b"default ststest.example", b"NOTFOUND "),
    (b"default plain.example", b"NOTFOUND "),
    (b"default bogus.example", b"TEMP MX lookup bogus: deferring"),
    (b"default broken.example", b"TEMP destination lookup failed: RuntimeError"),
    (b"default partner.example", b"OK dane-only"),
    (b"default [relay.example]:587", b"OK encrypt"),
    (b"default [other.example]:25", b"NOTFOUND "),
    (b"default .example", b"NOTFOUND "),
    (b"relaxed dane.example", b"OK may"),
    (b"relaxed bank.example", b"OK dane-only"),
    (b"relaxed partner.example", b"OK dane-only"),
    (b"relaxed strictpartner.example", b"OK secure match=nexthop"),
    (b"relaxed news.example", b"OK may"),
    (b"strict dane.example", b"OK dane-only"),
    (b"strict sts.example", b"OK secure match=mx.sts.example servername=hostname"),
    (b"strict+tlsrpt wild.example", b"OK secure match=mx.wild.example:a.backup.wild.example servername=hostname "
     b"policy_type=sts policy_domain=wild.example mx_host_pattern=mx.wild.example "
     b"mx_host_pattern=*.backup.wild.example { policy_string = version: STSv1 } { policy_string = mode: enforce }"
     b" { policy_string = mx: mx.wild.example } { policy_string = mx: *.backup.wild.example }"
     b" { policy_string = max_age: 86400 }"),
    # RFC 8461 section 5: a testing policy validates no MX for REQUIRETLS (the eligibility verdict).
    # The bounce verdict is a level Postfix 3.11 refuses for REQUIRETLS at once with 5.7.10.
    (b"strict ststest.example", b"OK encrypt"),
    (b"strict signed.example", b"OK secure match=hostname"),
    (b"strict plain.example", b"OK encrypt"),
    (b"strict news.example", b"OK encrypt"),
    (b"strict bank.example", b"OK dane-only"),
    (b"strict bogus.example", b"TEMP 4.4.3 MX lookup bogus: deferring"),
    (b"requiretls dane.example", b"OK enforce"),
    (b"requiretls internal.example", b"OK opportunistic"),
    (b"requiretls [10.1.2.3]", b"OK enforce"),
    (b"nosuchzone dane.example", b"PERM unknown map name"),
    (b"default bad..key", b"PERM invalid lookup key"),
    (b"default " + "bücher.example".encode(), b"PERM invalid lookup key"),
    (b"default " + b"a" * 400, b"PERM invalid lookup key"),
    (b"nospace", b"PERM malformed request"),
]


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "policyd.sock")


@contextlib.asynccontextmanager
async def running(path: str, resolver: FakeResolver | None = None) -> AsyncIterator[PolicyServer]:
    service = PolicyService(PolicyTable.parse(TABLE, "policy"), resolver or FakeResolver(DESTS), Metrics(),  # type: ignore[arg-type]
                            ServiceSettings(answer_ttl=60, lookup_timeout=2))
    server = PolicyServer(service)
    await server.listen([f"unix:{path}"])
    try:
        yield server
    finally:
        await server.shutdown(grace=2)


async def _exchange(path: str, requests: list[bytes], read_size: int) -> list[bytes]:
    reader, writer = await asyncio.open_unix_connection(path)
    stream = b"".join(encode(r) for r in requests)
    for i in range(0, len(stream), read_size):
        writer.write(stream[i : i + read_size])
        await writer.drain()
    dec = Decoder(100_000)
    replies: list[bytes] = []
    while len(replies) < len(requests):
        chunk = await asyncio.wait_for(reader.read(read_size), 5)
        assert chunk, "server closed the connection early"
        replies += dec.feed(chunk)
    writer.close()
    return replies


@pytest.mark.parametrize("read_size", [4096, 128, 16, 1])
def test_table_driven_replies_with_read_size(sock_path: str, read_size: int) -> None:
    async def main() -> list[bytes]:
        async with running(sock_path):
            first = await _exchange(sock_path, [r for r, _ in CASES], read_size)
            again = await _exchange(sock_path, [r for r, _ in CASES], read_size)  # now from the answer cache
            assert again == first
            return first

    replies = asyncio.run(main())
    assert [(r, got) for (r, _), got in zip(CASES, replies, strict=True)] == CASES


def test_concurrent_lookups_for_one_domain_keep_order_per_connection(sock_path: str) -> None:
    resolver = FakeResolver(DESTS, delay=0.05)

    async def main() -> list[list[bytes]]:
        async with running(sock_path, resolver):
            reqs = [b"default dane.example", b"default news.example", b"strict dane.example", b"requiretls x.example"]
            return await asyncio.gather(*(_exchange(sock_path, reqs, 4096) for _ in range(20)))

    results = asyncio.run(main())
    assert all(r == [b"OK dane-only", b"OK may", b"OK dane-only", b"OK enforce"] for r in results)


@pytest.mark.parametrize(
    ("raw", "expect"),
    [
        (b"3:abcd", b""),  # wrong length: framing lost -> clean close
        (b"xyz", b""),
        (b"99999999:", b"PERM "),  # oversized: PERM then close
        (b"2000:" + b"a" * 10, b"PERM "),
    ],
)
def test_bad_framing_closes_cleanly_and_server_keeps_serving(sock_path: str, raw: bytes, expect: bytes) -> None:
    async def main() -> tuple[bytes, list[bytes]]:
        async with running(sock_path):
            reader, writer = await asyncio.open_unix_connection(sock_path)
            writer.write(raw)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 5)  # until EOF: the server closed
            writer.close()
            return data, await _exchange(sock_path, [b"default news.example"], 4096)

    data, after = asyncio.run(main())
    if expect:
        assert expect in data
    else:
        assert data == b""
    assert after == [b"OK may"]


def test_metrics_count_requests_by_zone_and_answer(sock_path: str) -> None:
    async def main() -> Metrics:
        async with running(sock_path) as server:
            await _exchange(sock_path, [b"default news.example", b"default news.example", b"bad x"], 4096)
            return server.service.metrics

    m = asyncio.run(main())
    from prometheus_client import generate_latest

    text = generate_latest(m.registry).decode()
    assert 'requiretls_policyd_requests_total{answer="OK",level="may",zone="default"} 2.0' in text
    assert "requiretls_policyd_cache_hits_total 1.0" in text
    assert 'requiretls_policyd_requests_total{answer="PERM",level="",zone="-"} 1.0' in text
    assert "requiretls_policyd_cache_entries 1.0" in text  # the one cached answer
    assert 'requiretls_build_info{daemon="policyd",' in text


def test_answer_cache_is_bounded_and_still_counts_hits() -> None:
    """The ready-answer cache keeps at most ``answer_cache_size`` answers (expired ones go first, then the
    oldest); an evicted destination is simply looked up again, and served hits are still counted."""
    now = [0.0]
    resolver = FakeResolver({f"d{i}.example": dane(f"d{i}.example") for i in range(50)})
    metrics = Metrics()
    service = PolicyService(PolicyTable.empty(), resolver, metrics,
                            ServiceSettings(answer_ttl=60, answer_cache_size=10), clock=lambda: now[0])

    async def main() -> None:
        for i in range(50):
            assert await service.reply(f"default d{i}.example".encode()) == encode(b"OK dane-only")
            assert len(service._cache) <= 10
        assert service.cached(b"default d49.example") == encode(b"OK dane-only")
        assert service.cached(b"default d0.example") is None  # evicted: the next query looks it up again
        assert await service.reply(b"default d0.example") == encode(b"OK dane-only")
        now[0] += 61  # everything has expired: the first eviction clears all of it, not just the oldest
        assert service.cached(b"default d49.example") is None
        for i in range(10):
            await service.reply(f"default d{i}.example".encode())
        assert 1 <= len(service._cache) <= 10
        assert all(hit[0] > now[0] for hit in service._cache.values())

    asyncio.run(main())
    assert metrics._hits[0] == 1
    # one counting function per (zone, answer), shared by every cached answer with those labels
    assert metrics.hit_counter("default", "OK") is metrics.hit_counter("default", "OK")


def _query(path: str, req: bytes, timeout: float = 5) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(encode(req))
        dec = Decoder(10_000)
        while True:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            out = dec.feed(chunk)
            if out:
                return out[0]


def _start_daemon(tmp_path: Path, extra: str = "") -> tuple[subprocess.Popen[bytes], str]:
    (tmp_path / "policy").write_text(TABLE)
    sock = str(tmp_path / "d.sock")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[policy]\ntable = "policy"\n[dns]\nresolver = "127.0.0.1:9"\ntimeout = 1\n'
                   f'[policyd]\nlisten = ["unix:{sock}"]\n{extra}')
    proc = subprocess.Popen([sys.executable, "-m", "requiretls", "policyd", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    end = time.monotonic() + 15
    while not accepts_unix(sock):
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            out = proc.communicate()[0].decode(errors="replace")
            raise AssertionError(f"policyd did not start listening on {sock}:\n{out[-3000:]}")
        time.sleep(0.05)
    return proc, sock


def test_daemon_sigterm_exits_cleanly_and_removes_its_socket(tmp_path: Path) -> None:
    proc, sock = _start_daemon(tmp_path)
    try:
        assert _query(sock, b"default news.example") == b"OK may"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not os.path.exists(sock)


def test_daemon_sighup_reloads_the_table(tmp_path: Path) -> None:
    proc, sock = _start_daemon(tmp_path)
    try:
        assert _query(sock, b"default news.example") == b"OK may"
        (tmp_path / "policy").write_text("news.example encrypt\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 5
        while _query(sock, b"default news.example") != b"OK encrypt" and time.time() < deadline:
            time.sleep(0.05)
        assert _query(sock, b"default news.example") == b"OK encrypt"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.skipif(shutil.which("postmap") is None, reason="Postfix is not installed (make deps installs it)")
def test_real_postmap_queries_each_zone(tmp_path: Path) -> None:
    """Postfix 3.7's own socketmap client (postmap -q) against the daemon: table answers in every zone."""
    pf = tmp_path / "postfix"
    pf.mkdir()
    (pf / "main.cf").write_text("compatibility_level = 3.6\n")
    shutil.copy("/usr/share/postfix/master.cf.dist", pf / "master.cf")
    proc, sock = _start_daemon(tmp_path)

    def postmap(key: str, zone: str) -> tuple[int, str]:
        r = subprocess.run(["postmap", "-c", str(pf), "-q", key, f"socketmap:unix:{sock}:{zone}"],
                           capture_output=True, text=True, timeout=30)
        return r.returncode, (r.stdout.strip() or r.stderr.strip())

    try:
        assert postmap("bank.example", "default") == (0, "dane-only")
        assert postmap("news.example", "relaxed") == (0, "may")
        assert postmap("bank.example", "relaxed") == (0, "dane-only")
        assert postmap("agency.gov.example", "strict") == (0, "secure")
        assert postmap("internal.example", "requiretls") == (0, "opportunistic")
        assert postmap("somewhere.example", "requiretls") == (0, "enforce")
        rc, err = postmap("unsigned.example", "strict")  # resolver 127.0.0.1:9 does not answer
        assert rc != 0 and "temporary error" in err
        rc, err = postmap("x.example", "nosuchzone")
        assert rc != 0 and "permanent error: unknown map name" in err
    finally:
        proc.terminate()
        proc.wait(10)
