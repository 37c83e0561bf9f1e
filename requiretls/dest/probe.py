"""REQUIRETLS probes: one :func:`requiretls.dest.session.open_session` per MX, cached and single-flight, for
``requiretls check --probe`` and the milter's pre-flight (RFC 8689 section 4.2.1 steps 3-5).

The session runs in a worker thread (smtplib blocks); the first address of a host that answers is the one
reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

from requiretls.facts import Destination, MxHost, SessionResult, SessionStage, TlsaRecord

from .cache import Cache, MemoryCache, SingleFlight
from .errors import CacheError
from .session import SessionSettings, open_session


@dataclass(frozen=True)
class ProbeSettings:
    port: int = 25
    timeout: float = 20.0
    cafile: str | None = None  # None: the system trust store
    helo_name: str | None = None  # None: socket.getfqdn()
    cache_ttl: float = 300.0
    failure_cache_ttl: float = 60.0
    capath: str | None = None  # a hashed CA directory, with or without cafile

    @property
    def session(self) -> SessionSettings:
        return SessionSettings(self.port, self.timeout, self.cafile, self.helo_name or "", capath=self.capath)


def probe_sync(host: str, addresses: Sequence[str], settings: ProbeSettings,
               tlsa: Sequence[TlsaRecord] = (), dane_names: Sequence[str] = (),
               sni: str | None = None) -> SessionResult:
    """Probe one MX host (blocking): the session with the first of ``addresses`` that gets past the greeting."""
    results: list[SessionResult] = []
    for address in addresses:
        with open_session(host, address, settings.session, tlsa, dane_names, sni) as session:
            results.append(session.result)
        if session.result.stage is not SessionStage.CONNECT:
            return session.result
    if not results:
        return SessionResult(host, port=settings.port, verification="dane" if tlsa else "pkix", transient=True,
                             error="no address to connect to")
    return replace(results[-1], address="", error="; ".join(f"[{r.address}]: {r.error}" for r in results))


class Prober:
    """Asynchronous, cached, single-flight REQUIRETLS probes."""

    def __init__(self, settings: ProbeSettings | None = None, cache: Cache | None = None) -> None:
        self.settings = settings or ProbeSettings()
        self.cache: Cache = cache if cache is not None else MemoryCache()
        self._flight: SingleFlight[SessionResult] = SingleFlight()

    async def probe_host(self, dest: Destination, host: MxHost) -> SessionResult:
        """Probe ``host`` of ``dest``: DANE when it has usable TLSA records, else PKIX."""
        tlsa = host.usable_tlsa
        mode = "dane" if tlsa else "pkix"
        key = f"probe:{host.name}:{self.settings.port}:{mode}"
        try:
            raw = await self.cache.get(key)
            if raw is not None:
                return replace(SessionResult.from_dict(json.loads(raw)), cached=True)
        except (CacheError, ValueError, TypeError, KeyError):
            pass
        names = host.dane_reference_names(dest.domain, dest.canonical)

        async def run() -> SessionResult:
            result = await asyncio.to_thread(probe_sync, host.name, host.addresses, self.settings, tlsa, names,
                                             host.tlsa_base or host.name)
            done = result.stage is SessionStage.DONE
            ttl = self.settings.cache_ttl if done else self.settings.failure_cache_ttl
            with contextlib.suppress(CacheError):
                await self.cache.set(key, json.dumps(result.to_dict()).encode(), ttl)
            return result

        return await self._flight.run(key, run)

    async def probe_hosts(self, dest: Destination, hosts: Sequence[MxHost]) -> tuple[SessionResult, ...]:
        """Probe ``hosts`` of ``dest`` concurrently, in their order."""
        return tuple(await asyncio.gather(*(self.probe_host(dest, h) for h in hosts)))
