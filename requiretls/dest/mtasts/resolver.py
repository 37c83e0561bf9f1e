"""MTA-STS resolution (RFC 8461 sections 3 and 5): discovery record, fetch on a new ``id``, the policy store,
proactive refresh.  Parsing is :mod:`.parse`, the HTTPS GET :mod:`.fetch`, the store :mod:`.store`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from requiretls.facts import StsPolicy, StsResult, StsStatus

from ..cache import Cache, MemoryCache, SingleFlight
from ..dnssec import DnsClient, LookupStatus, normalize_name
from ..errors import MtaStsError, MtaStsFetchError, MtaStsRecordError, MtaStsTemporaryError
from .fetch import PolicyFetcher, policy_host
from .parse import StsRecord, parse_policy, select_sts_record
from .settings import StsSettings
from .store import PolicyStore

log = logging.getLogger("requiretls.dest.mtasts")


@dataclass
class StsResolver:
    """MTA-STS policy discovery with caching and refresh (RFC 8461 sections 3.3 and 5).

    ``cache`` is the backend of the one :class:`PolicyStore` (``self.store``); ``fetcher`` does the HTTPS GET
    (the built-in HTTP/1.1 client unless another is given).
    """

    dns: DnsClient
    settings: StsSettings = field(default_factory=StsSettings)
    cache: Cache = field(default_factory=MemoryCache)
    clock: Callable[[], float] = time.time
    fetcher: PolicyFetcher = field(default_factory=PolicyFetcher, repr=False)
    store: PolicyStore = field(init=False, repr=False)
    _flight: SingleFlight[StsPolicy] = field(default_factory=SingleFlight, repr=False)
    _background: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.store = PolicyStore(self.cache, lambda: self.clock())

    # fetch ---------------------------------------------------------------------------
    async def fetch(self, domain: str, record_id: str) -> StsPolicy:
        """Fetch and parse the policy now (no cache); raises an :class:`MtaStsError`."""
        host = policy_host(domain)
        addrs: list[str] = []
        errors: list[str] = []
        # the policy host's addresses come from our validating resolver, never from the system's
        for answer in await self.dns.query_many(host, ("A", "AAAA")):
            if answer.status is LookupStatus.ANSWER and answer.state.trustworthy:
                addrs.extend(answer.rdata)
            elif answer.status is LookupStatus.ERROR:
                errors.append(f"{answer.rdtype}: {answer.state.value} {answer.error}")
        if not addrs:
            raise MtaStsFetchError(f"{host}: no address ({'; '.join(errors) or 'no A/AAAA record'})")
        text = await self.fetcher.fetch_text(domain, addrs, self.settings)
        policy = parse_policy(text, self.settings.max_age_limit)
        return replace(policy, policy_id=record_id, fetched_at=self.clock())

    async def _fetch_and_store(self, domain: str, record_id: str) -> StsPolicy:
        policy = await self.fetch(domain, record_id)
        await self.store.put(domain, policy)
        log.info("domain=%s, sts_id=%s, mode=%s, max_age=%d, fetched", domain, record_id,
                 policy.mode.value, policy.max_age)
        return policy

    # public --------------------------------------------------------------------------
    async def lookup_record(self, domain: str) -> tuple[StsRecord | None, StsStatus, str]:
        """The ``_mta-sts`` record of ``domain``: (record, status-if-none, detail)."""
        answer = await self.dns.query("_mta-sts." + domain, "TXT")
        if answer.status is LookupStatus.ERROR or not answer.state.trustworthy:
            return None, StsStatus.RECORD_LOOKUP_FAILED, f"TXT lookup {answer.state.value}: {answer.error}"
        if answer.status is not LookupStatus.ANSWER:
            return None, StsStatus.NO_RECORD, "no _mta-sts TXT record"
        try:
            return select_sts_record(answer.rdata), StsStatus.FETCHED, ""
        except MtaStsRecordError as e:
            status = StsStatus.NO_RECORD if "no v=STSv1" in str(e) else StsStatus.RECORD_INVALID
            return None, status, str(e)

    async def resolve(self, domain: str) -> StsResult:
        """The MTA-STS policy a sender applies to ``domain`` now."""
        domain = normalize_name(domain)
        record, status, detail = await self.lookup_record(domain)
        loaded = await self.store.get(domain)
        cached = loaded.policy
        if record is None:
            if cached is not None:
                return StsResult(domain, StsStatus.CACHED_NO_RECORD, cached, None, detail)
            return StsResult(domain, status, None, None, detail)
        if cached is not None and cached.policy_id == record.id:
            self._maybe_refresh(domain, cached)
            return StsResult(domain, StsStatus.CACHED, cached, record.id)
        recent = await self.store.failed_recently(domain, record.id)
        if recent is None:
            try:
                policy = await self._flight.run(f"{domain}:{record.id}",
                                                lambda: self._fetch_and_store(domain, record.id))
                return StsResult(domain, StsStatus.FETCHED, policy, record.id)
            except MtaStsError as e:
                recent = f"{type(e).__name__}: {e}"
                log.warning("domain=%s, sts_id=%s, fetch_error=%s", domain, record.id, recent)
                await self.store.remember_failure(domain, record.id, recent, self.settings.retry_after_failure)
        if cached is not None:
            return StsResult(domain, StsStatus.CACHED_FETCH_FAILED, cached, record.id, recent)
        if not loaded.readable:
            raise MtaStsTemporaryError(
                f"{domain}: policy fetch failed ({recent}) and the cache is unreadable")
        return StsResult(domain, StsStatus.FETCH_FAILED, None, record.id, recent)

    def refresh_due(self, policy: StsPolicy) -> bool:
        now = self.clock()
        return (now - policy.fetched_at >= self.settings.refresh_interval
                or policy.expires_at - now <= self.settings.refresh_margin)

    def _maybe_refresh(self, domain: str, policy: StsPolicy) -> None:
        if not self.refresh_due(policy):
            return
        task = asyncio.ensure_future(self.refresh(domain))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def refresh(self, domain: str) -> StsResult:
        """Re-check the TXT record and re-fetch the policy even when the ``id`` is unchanged,
        so that ``max_age`` starts again (RFC 8461 section 3.3, 10.2).  A failure keeps the
        cached policy."""
        domain = normalize_name(domain)
        record, status, detail = await self.lookup_record(domain)
        cached = (await self.store.get(domain)).policy
        if record is None:
            return StsResult(domain, StsStatus.CACHED_NO_RECORD if cached else status, cached, None, detail)
        try:
            policy = await self._flight.run(f"{domain}:{record.id}",
                                            lambda: self._fetch_and_store(domain, record.id))
        except MtaStsError as e:
            log.warning("domain=%s, sts_id=%s, refresh_error=%s", domain, record.id, e)
            if cached is not None:
                return StsResult(domain, StsStatus.CACHED_FETCH_FAILED, cached, record.id, str(e))
            return StsResult(domain, StsStatus.FETCH_FAILED, None, record.id, str(e))
        return StsResult(domain, StsStatus.FETCHED, policy, record.id)

    async def refresh_all(self) -> int:
        """Refresh every cached policy that is due; returns how many were refreshed.
        Meant to run periodically (e.g. hourly) in a long-lived daemon."""
        count = 0
        for domain in sorted(await self.store.domains()):
            policy = (await self.store.get(domain)).policy
            if policy is not None and self.refresh_due(policy):
                await self.refresh(domain)
                count += 1
        return count

    async def wait_background(self) -> None:
        """Wait for proactive refreshes started by :meth:`resolve` (tests, shutdown)."""
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
