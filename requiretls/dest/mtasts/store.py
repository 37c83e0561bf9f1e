"""The one store of MTA-STS policies (RFC 8461 section 5.1) and of recent fetch failures (section 3.3).

A policy, once fetched, must be applied until its ``max_age`` ends, even when the TXT record disappears or the
next fetch fails.  The store therefore holds policies where no cache eviction or outage can take them away:

* every policy lives in a per-process map (``domain -> StsPolicy``), kept until it expires.  With the memory
  backend that map *is* the store: no second copy, no serialisation, and the bounded ``MemoryCache`` (whose
  eviction could drop a policy before its ``max_age``) never holds policies;
* with a persistent or shared backend (SQLite, Redis) every write also goes to the backend (``sts:DOMAIN``,
  JSON, TTL = the policy's remaining lifetime), and reads ask the backend first, so that a restart or another
  MTA of the fleet sees the policy.  When the backend fails, misses (eviction, a flushed Redis) or returns a
  damaged entry, the per-process map answers: a cache outage can never make a policy that this process knows
  invisible.  Of the two copies the later fetch wins, and a policy read from the backend is copied into the
  map, so the fallback is the newest one known.

Fetch failures (``stsfail:DOMAIN:ID``, kept ``retry_after_failure`` seconds) go to the backend only: losing one
to eviction or an outage costs one extra fetch attempt, never a weaker answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from requiretls.facts import StsPolicy

from ..cache import Cache, MemoryCache
from ..errors import CacheError

log = logging.getLogger("requiretls.dest.mtasts")

POLICY_PREFIX = "sts:"
FAILURE_PREFIX = "stsfail:"


@dataclass(frozen=True)
class Loaded:
    """A store read: the unexpired policy (``None``: none known) and whether the backend could be read (when it
    could not, a policy stored by another process may exist where we cannot see it)."""

    policy: StsPolicy | None
    readable: bool


class PolicyStore:
    """Policies by domain, kept for their ``max_age`` whatever happens to ``backend``; see the module text."""

    def __init__(self, backend: Cache, clock: Callable[[], float]) -> None:
        self.backend = backend
        self.clock = clock
        self._local: dict[str, StsPolicy] = {}
        # The memory backend lives in this process too: the map alone is the store.  Only the exact class
        # qualifies: a subclass may put anything behind get/set, so it is treated like any other backend.
        self._shared = type(backend) is not MemoryCache

    def __len__(self) -> int:
        return len(self._local)

    async def get(self, domain: str) -> Loaded:
        local = self._local.get(domain)
        policy, readable = local, True
        if self._shared:
            try:
                raw = await self.backend.get(POLICY_PREFIX + domain)
            except CacheError as e:
                log.warning("domain=%s, cache_error=%s", domain, e)
                readable = False
            else:
                if raw is not None:
                    try:
                        shared = StsPolicy.from_dict(json.loads(raw))
                    except (ValueError, KeyError, TypeError) as e:
                        log.warning("domain=%s, cache_entry_invalid=%s", domain, e)
                    else:
                        # the later fetch wins: another MTA's, or ours when a write to the backend failed
                        if local is None or shared.fetched_at >= local.fetched_at:
                            policy = shared
        if policy is not None and policy.expires_at <= self.clock():
            self._local.pop(domain, None)
            return Loaded(None, readable)
        if policy is not None and policy is not local:
            self._local[domain] = policy
        return Loaded(policy, readable)

    async def put(self, domain: str, policy: StsPolicy) -> None:
        ttl = policy.expires_at - self.clock()
        if ttl > 0:
            self._local[domain] = policy
        else:
            self._local.pop(domain, None)
        if not self._shared:
            return
        try:
            if ttl > 0:
                await self.backend.set(POLICY_PREFIX + domain, json.dumps(policy.to_dict()).encode(), ttl)
            else:
                await self.backend.delete(POLICY_PREFIX + domain)
        except CacheError as e:
            log.warning("domain=%s, cache_error=%s", domain, e)

    async def domains(self) -> set[str]:
        """Every domain with a stored policy (expired ones leave the map here)."""
        now = self.clock()
        for domain in [d for d, p in self._local.items() if p.expires_at <= now]:
            del self._local[domain]
        found = set(self._local)
        if self._shared:
            try:
                found.update(k[len(POLICY_PREFIX):] for k in await self.backend.keys(POLICY_PREFIX))
            except CacheError as e:
                log.warning("proactive refresh: cache_error=%s", e)
        return found

    async def failed_recently(self, domain: str, record_id: str) -> str | None:
        """The error of a fetch of this ``id`` that failed within ``retry_after_failure`` (RFC 8461 section 3.3)."""
        try:
            raw = await self.backend.get(f"{FAILURE_PREFIX}{domain}:{record_id}")
        except CacheError:
            return None
        return raw.decode("utf-8", "replace") if raw is not None else None

    async def remember_failure(self, domain: str, record_id: str, error: str, ttl: float) -> None:
        try:
            await self.backend.set(f"{FAILURE_PREFIX}{domain}:{record_id}", error.encode(), ttl)
        except CacheError as e:
            log.warning("domain=%s, cache_error=%s", domain, e)
