"""Destination facts for policyd tests: the DNS/MTA-STS boundary is faked; socketmap, framing and answers are
real.  (The testbed suite proves the same answers against real DNSSEC DNS and a real MTA-STS server.)"""

from __future__ import annotations

import asyncio

from requiretls.dest import Destination, DnssecState, MxHost, MxSource, StsResult, StsStatus, TlsRequirement
from requiretls.dest.dane import TlsaRecord
from requiretls.dest.destination import DaneState
from requiretls.dest.mtasts import StsMode, StsPolicy

TLSA = TlsaRecord(3, 1, 1, b"\x01" * 32)


def dane(domain: str, all_tlsa: bool = True) -> Destination:
    hosts = (MxHost(f"mx1.{domain}", 10, True, ("192.0.2.1",), DnssecState.SECURE, dane=DaneState.USABLE,
                    tlsa=(TLSA,)),)
    if not all_tlsa:
        hosts += (MxHost(f"mx2.{domain}", 20, True, ("192.0.2.2",), DnssecState.SECURE, dane=DaneState.NONE),)
    return Destination(domain, MxSource.MX, DnssecState.SECURE, hosts, None, TlsRequirement.DANE, "dane", 300)


def sts(domain: str, mode: StsMode = StsMode.ENFORCE, mx: tuple[str, ...] | None = None) -> Destination:
    """An MTA-STS destination, policy ``mx.D`` and ``*.backup.D``; ``mx``: its MX host names (default mx.D)."""
    policy = StsPolicy(mode, 86400, (f"mx.{domain}", f"*.backup.{domain}"))
    result = StsResult(domain, StsStatus.FETCHED, policy, "id1")
    req = TlsRequirement.STS_ENFORCE if mode is StsMode.ENFORCE else TlsRequirement.STS_TESTING
    hosts = tuple(MxHost(name, 10 * (i + 1), False, ("192.0.2.3",), DnssecState.INSECURE,
                         sts_match=policy.matches(name)) for i, name in enumerate(mx or (f"mx.{domain}",)))
    return Destination(domain, MxSource.MX, DnssecState.INSECURE, hosts, result, req, "sts", 300)


def plain(domain: str, secure: bool = False) -> Destination:
    state = DnssecState.SECURE if secure else DnssecState.INSECURE
    host = MxHost(f"mx.{domain}", 10, secure, ("192.0.2.4",), state, dane=DaneState.NONE)
    return Destination(domain, MxSource.MX, state, (host,), None, TlsRequirement.OPPORTUNISTIC, "nothing", 300)


def deferred(domain: str) -> Destination:
    return Destination(domain, MxSource.ERROR, DnssecState.BOGUS, (), None, TlsRequirement.DEFER,
                       "MX lookup bogus: deferring", 0)


class FakeResolver:
    """Maps a domain to a Destination, an exception, or a delay; counts lookups."""

    def __init__(self, answers: dict[str, object], delay: float = 0.0) -> None:
        self.answers = answers
        self.delay = delay
        self.calls: list[str] = []

    async def lookup(self, domain: str) -> Destination:
        self.calls.append(domain)
        if self.delay:
            await asyncio.sleep(self.delay)
        a = self.answers.get(domain)
        if isinstance(a, Exception):
            raise a
        if a is None:
            return plain(domain)
        assert isinstance(a, Destination)
        return a
