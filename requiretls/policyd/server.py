"""The socketmap server Postfix's ``smtp_tls_policy_maps`` (and 3.11's ``smtp_requiretls_policy``) query.

One asyncio process, unix and/or loopback TCP listeners, many connections, several requests per connection.
Replies on a connection keep the order of its requests.  The hot path is a dictionary of ready-made reply
bytes per (zone, key): a warm answer costs a dict lookup and a write, no allocation storm.  A miss runs the
destination lookup (DNS, MTA-STS; coalesced per domain by :mod:`requiretls.dest`) in a task; DNS or MTA-STS
trouble answers TEMP, so Postfix defers instead of using a weaker level.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from requiretls.daemon import UnixSocket, install_signals, notify, prepare_unix_socket, set_socket_mode
from requiretls.dest import DestinationResolver
from requiretls.dest.cache import evict
from requiretls.log import kv
from requiretls.policy.table import PolicyTable
from requiretls.policy.tlsmap import (
    TLSRPT_SUFFIX,
    Answer,
    Query,
    Status,
    Zone,
    answer,
    needs_destination,
    parse_key,
)
from requiretls.policyd.metrics import Metrics, level_of
from requiretls.policyd.netstring import Decoder, NetstringError, TooLong, encode

log = logging.getLogger("requiretls")

MAX_REQUEST = 1024
MAX_PENDING = 256
#: Most client connections at once; one more is closed at once (logged).  Postfix holds one per smtp process and
#: map name (default_process_limit 100 per transport), so 1000 leaves room and stays within the usual soft limit
#: of 1024 open files.
MAX_CONNECTIONS = 1000
#: Map name -> (zone, whether answers carry the TLSRPT attributes by name).
_ZONES = {**{z.value.encode(): (z, False) for z in Zone},
          **{(z.value + TLSRPT_SUFFIX).encode(): (z, True) for z in Zone}}


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    answer_ttl: float = 60.0
    lookup_timeout: float = 30.0
    answer_cache_size: int = 100_000
    #: Seconds a connection may sit idle (no request, no answer pending) before it is closed.
    idle_timeout: float = 300.0
    #: Which answers carry Postfix 3.10+'s TLSRPT attributes: ``map`` (the map name says: ``default+tlsrpt``),
    #: ``plain`` (none, whatever the name) or ``tlsrpt`` (all MTA-STS answers).
    attributes: str = "map"


class PolicyService:
    """Answers (zone, key) lookups; shared by every connection."""

    def __init__(self, table: PolicyTable, resolver: DestinationResolver | None, metrics: Metrics,
                 settings: ServiceSettings | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.table = table
        self.resolver = resolver
        self.metrics = metrics
        self.settings = settings or ServiceSettings()
        self.clock = clock
        self._cache: dict[bytes, tuple[float, bytes, Callable[[], None]]] = {}
        metrics.cache_size = lambda: len(self._cache)

    def set_table(self, table: PolicyTable) -> None:
        self.table = table
        self._cache.clear()

    def cached(self, request: bytes) -> bytes | None:
        hit = self._cache.get(request)
        if hit is not None and hit[0] > self.clock():
            hit[2]()
            return hit[1]
        return None

    async def reply(self, request: bytes) -> bytes:
        """The framed reply for one framed-off request payload (``name key``)."""
        hit = self.cached(request)
        if hit is not None:
            return hit
        name, sep, rawkey = request.partition(b" ")
        found = _ZONES.get(name)
        if found is None or not sep:
            self.metrics.error("unknown_zone" if sep else "malformed")
            return self._frame(Answer(Status.PERM, "unknown map name" if sep else "malformed request"), "-")
        zone, by_name = found
        mode = self.settings.attributes
        attributes = mode == "tlsrpt" or (mode == "map" and by_name)
        try:
            key_text = rawkey.decode("ascii")
        except UnicodeDecodeError:
            self.metrics.error("bad_key")
            return self._frame(Answer(Status.PERM, "invalid lookup key"), zone)
        query = parse_key(key_text)
        if isinstance(query, Answer):
            self.metrics.error("bad_key")
            return self._frame(query, zone)
        ans, ttl = await self._answer(zone, query, attributes)
        wire = self._frame(ans, zone)
        if ans.status is not Status.TEMP and ttl > 0:
            if len(self._cache) >= self.settings.answer_cache_size and request not in self._cache:
                # an evicted answer is simply looked up again
                now = self.clock()
                evict(self._cache, self.settings.answer_cache_size, lambda hit: hit[0] <= now)
            self._cache[request] = (self.clock() + ttl, wire, self.metrics.hit_counter(
                str(zone), ans.status.value, level_of(ans.status.value, ans.data)))
        return wire

    async def _answer(self, zone: Zone, query: Query, attributes: bool = False) -> tuple[Answer, float]:
        if not needs_destination(zone, query, self.table) or query.domain is None:
            return answer(zone, query, self.table), self.settings.answer_ttl
        if self.resolver is None:
            return answer(zone, query, self.table, None, "no destination resolver configured"), 0.0
        started = self.clock()
        try:
            dest = await asyncio.wait_for(self.resolver.lookup(query.domain), self.settings.lookup_timeout)
        except TimeoutError:
            self.metrics.error("lookup_timeout")
            return answer(zone, query, self.table, None, "destination lookup timed out"), 0.0
        except Exception as e:  # any lookup failure must become TEMP: never a crash or a weaker answer
            self.metrics.error("lookup_failed")
            log.warning("%s", kv(zone=str(zone), key=query.key, lookup_error=f"{type(e).__name__}: {e}"))
            return answer(zone, query, self.table, None, f"destination lookup failed: {type(e).__name__}"), 0.0
        finally:
            self.metrics.lookup_seconds(self.clock() - started)
        ttl = max(0.0, min(float(dest.ttl), self.settings.answer_ttl))
        return answer(zone, query, self.table, dest, attributes=attributes), ttl

    def _frame(self, ans: Answer, zone: Zone | str) -> bytes:
        self.metrics.request(str(zone), ans.status.value, level_of(ans.status.value, ans.data))
        return encode(ans.wire().encode("ascii", "replace"))


class SocketmapProtocol(asyncio.Protocol):
    """One Postfix connection."""

    def __init__(self, service: PolicyService, server: PolicyServer) -> None:
        self.service = service
        self.server = server
        self.decoder = Decoder(MAX_REQUEST)
        self.queue: collections.deque[bytes] = collections.deque()
        self.worker: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.idle: asyncio.TimerHandle | None = None
        self.last_active = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        self.transport = cast(asyncio.Transport, transport)
        if len(self.server.connections) >= MAX_CONNECTIONS:
            self.service.metrics.error("too_many_connections")
            self.server.refused += 1
            if self.server.refused in (1, 10, 100) or self.server.refused % 1000 == 0:
                log.warning("%s", kv(refused_connection="too many client connections", limit=MAX_CONNECTIONS,
                                     refused_so_far=self.server.refused))
            self.transport.close()
            self.transport = None
            return
        self.server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._touch()

    def _touch(self) -> None:
        """Note activity; the idle timer checks it when it fires (no re-arming on every request)."""
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        if self.idle is None:
            self.idle = loop.call_later(self.service.settings.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        self.idle = None
        if self.transport is None:
            return
        loop = asyncio.get_running_loop()
        left = self.last_active + self.service.settings.idle_timeout - loop.time()
        if self.worker is not None or self.queue or left > 0:
            # Busy (an answer is being looked up) or active since: look again later.
            self.idle = loop.call_later(max(left, 1.0), self._idle_check)
            return
        self.service.metrics.error("idle_timeout")
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        self.last_active = asyncio.get_running_loop().time()
        try:
            requests = self.decoder.feed(data)
        except TooLong as e:
            self.service.metrics.error("too_long")
            transport.write(encode(f"PERM {e}".encode()))
            transport.close()
            return
        except NetstringError:
            self.service.metrics.error("bad_netstring")
            transport.close()
            return
        for req in requests:
            # A hit is written at once only when nothing is waiting before it: replies keep request order.
            if self.worker is None and not self.queue:
                hit = self.service.cached(req)
                if hit is not None:
                    transport.write(hit)
                    continue
            self.queue.append(req)
        if len(self.queue) > MAX_PENDING:
            self.service.metrics.error("too_many_pending")
            transport.close()
            return
        if self.queue and self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        try:
            while self.queue:
                req = self.queue.popleft()
                wire = await self.service.reply(req)
                if self.transport is None:
                    return
                self.transport.write(wire)
                self.last_active = asyncio.get_running_loop().time()
        finally:
            self.worker = None


class PolicyServer:
    """Listeners plus graceful shutdown: stop accepting, finish answers in progress, flush, close."""

    def __init__(self, service: PolicyService) -> None:
        self.service = service
        self.connections: set[SocketmapProtocol] = set()
        #: Connections closed at once because MAX_CONNECTIONS were open.
        self.refused = 0
        self.servers: list[asyncio.base_events.Server] = []
        self.unix_paths: list[str] = []

    async def listen(self, specs: Sequence[str], socket_mode: int = 0o666) -> None:
        loop = asyncio.get_running_loop()
        for spec in specs:
            kind, _, rest = spec.partition(":")
            if kind == "unix":
                sock = UnixSocket(rest, socket_mode)
                prepare_unix_socket(sock)
                srv = await loop.create_unix_server(lambda: SocketmapProtocol(self.service, self), rest, backlog=512)
                set_socket_mode(sock)
                self.unix_paths.append(rest)
            elif kind == "inet":
                host, _, port = rest.rpartition(":")
                srv = await loop.create_server(lambda: SocketmapProtocol(self.service, self),
                                               host.strip("[]") or "127.0.0.1", int(port), backlog=512,
                                               reuse_address=True)
            else:
                raise ValueError(f"listen address {spec!r}: use unix:/path or inet:HOST:PORT")
            self.servers.append(srv)
            log.info("%s", kv(listening=spec))

    async def shutdown(self, grace: float = 10.0) -> None:
        for srv in self.servers:
            srv.close()
        deadline = time.monotonic() + grace
        while any(c.worker is not None for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()  # asyncio flushes what was written before closing
        for srv in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        for path in self.unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)


async def serve_forever(server: PolicyServer, specs: Sequence[str], reload: Callable[[], object] | None = None,
                        ready: Callable[[], None] | None = None) -> None:
    """Listen, tell systemd, and run until SIGTERM/SIGINT; SIGHUP calls ``reload``."""
    stop = asyncio.Event()
    install_signals(stop, reload)
    await server.listen(specs)
    notify("READY=1")
    if ready is not None:
        ready()
    await stop.wait()
    notify("STOPPING=1")
    log.info("%s", kv(shutdown="SIGTERM", connections=len(server.connections)))
    await server.shutdown()
