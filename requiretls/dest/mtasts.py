"""MTA-STS (RFC 8461): discovery record, policy fetch and parsing, caching, refresh.

Flow of :meth:`StsResolver.resolve` (RFC 8461 sections 3 and 5):

1. Look up ``_mta-sts.DOMAIN`` TXT (CNAMEs followed).  Exactly one record that
   starts with ``v=STSv1`` must remain, with a valid ``id`` (section 3.1).
2. A cached, unexpired policy with the same ``id`` is used as it is.  A missing
   or invalid TXT record does not flush the cache (section 3.1, 10.2).
3. Otherwise fetch ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``: SNI and a
   certificate valid for ``mta-sts.DOMAIN``, status 200 only, no redirects, a
   size cap, ``text/plain``, a timeout (section 3.3).
4. When the fetch fails, a cached policy is still applied; with nothing cached
   the domain is treated as having no policy (section 3.3), and the fetch is
   not retried for the same ``id`` for ``retry_after_failure`` seconds.
5. Policies are refreshed proactively before they expire (section 3.3, 10.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from requiretls.facts import StsMode, StsPolicy, StsResult, StsStatus

from .cache import Cache, MemoryCache, SingleFlight
from .dnssec import DnsClient, LookupStatus, normalize_name
from .errors import (
    CacheError,
    MtaStsError,
    MtaStsFetchError,
    MtaStsHttpStatusError,
    MtaStsMediaTypeError,
    MtaStsPolicyError,
    MtaStsRecordError,
    MtaStsRedirectError,
    MtaStsTemporaryError,
    MtaStsTimeoutError,
    MtaStsTlsError,
    MtaStsTooLargeError,
)

log = logging.getLogger("requiretls.dest.mtasts")

#: RFC 8461 section 3.2: ``max_age`` is at most 31557600 seconds (about a year).
MAX_AGE_LIMIT = 31557600
POLICY_PATH = "/.well-known/mta-sts.txt"

_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}")
_EXT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE_RE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_MAX_AGE_RE = re.compile(r"[0-9]{1,10}")
_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class StsRecord:
    """The parsed ``_mta-sts`` TXT record (RFC 8461 section 3.1)."""

    id: str
    extensions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StsSettings:
    """Tunables of MTA-STS discovery and fetching (RFC 8461 section 3.3 suggestions)."""

    cafile: str | None = None  # None: the system trust store
    fetch_timeout: float = 30.0
    max_body_size: int = 65536
    max_header_size: int = 16384
    https_port: int = 443
    max_age_limit: int = MAX_AGE_LIMIT
    retry_after_failure: float = 300.0
    refresh_interval: float = 86400.0
    refresh_margin: float = 3600.0
    user_agent: str = "requiretls-mta-sts/1"


# --- discovery record -------------------------------------------------------------------


def parse_sts_record(text: str) -> StsRecord:
    """Parse one TXT record (strings already joined), RFC 8461 section 3.1 ABNF."""
    if not text.startswith("v=STSv1"):
        raise MtaStsRecordError(f"not an STSv1 record: {text!r}")
    fields = [f.strip(" \t") for f in text.split(";")]
    if fields[0] != "v=STSv1":
        raise MtaStsRecordError(f"bad version field in {text!r}")
    rest = fields[1:]
    if rest and rest[-1] == "":
        rest = rest[:-1]  # one trailing delimiter is allowed
    record_id: str | None = None
    ext: list[tuple[str, str]] = []
    if not rest:
        raise MtaStsRecordError(f"no id field in {text!r}")
    for f in rest:
        key, sep, value = f.partition("=")
        if not sep or not key:
            raise MtaStsRecordError(f"malformed field {f!r} in {text!r}")
        if key == "id":
            if not _ID_RE.fullmatch(value):
                raise MtaStsRecordError(f"invalid id {value!r} (1-32 letters and digits)")
            if record_id is None:
                record_id = value
        elif _EXT_NAME_RE.fullmatch(key) and _EXT_VALUE_RE.fullmatch(value):
            ext.append((key, value))
        else:
            raise MtaStsRecordError(f"malformed field {f!r} in {text!r}")
    if record_id is None:
        raise MtaStsRecordError(f"no id field in {text!r}")
    return StsRecord(record_id, tuple(ext))


def select_sts_record(texts: Sequence[str]) -> StsRecord:
    """From all TXT records at ``_mta-sts``, keep those starting with ``v=STSv1``;
    exactly one must remain and be valid (RFC 8461 section 3.1)."""
    candidates = [t for t in texts if t.startswith("v=STSv1")]
    if not candidates:
        raise MtaStsRecordError("no v=STSv1 TXT record")
    if len(candidates) > 1:
        raise MtaStsRecordError(f"{len(candidates)} v=STSv1 TXT records; exactly one is allowed")
    return parse_sts_record(candidates[0])


# --- policy body --------------------------------------------------------------------------


def valid_mx_pattern(pattern: str) -> bool:
    """``["*."] Domain`` in A-label form; the wildcard only as the whole left-most label."""
    host = pattern[2:] if pattern.startswith("*.") else pattern
    if not host or len(host) > 253 or "*" in host:
        return False
    labels = host.split(".")
    return len(labels) >= 1 and all(_LABEL_RE.fullmatch(label) for label in labels)


def parse_policy(text: str, max_age_limit: int = MAX_AGE_LIMIT) -> StsPolicy:
    """Parse a policy body (RFC 8461 section 3.2).

    Keys are case-sensitive; unknown keys are ignored; for a repeated key other
    than ``mx`` the first one counts; ``max_age`` above the limit is clamped.
    """
    first: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.split("\n"):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line.strip(" \t"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise MtaStsPolicyError(f"line without ':' in policy: {line[:80]!r}")
        key = key.strip(" \t")
        value = value.strip(" \t")
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not valid_mx_pattern(pattern):
                raise MtaStsPolicyError(f"invalid mx pattern {value!r}")
            if pattern not in mx:
                mx.append(pattern)
        elif key not in first:
            first[key] = value
    if first.get("version") != "STSv1":
        raise MtaStsPolicyError(f"version must be STSv1, not {first.get('version')!r}")
    try:
        mode = StsMode(first.get("mode", ""))
    except ValueError:
        raise MtaStsPolicyError(f"invalid mode {first.get('mode')!r}") from None
    age_text = first.get("max_age", "")
    if not _MAX_AGE_RE.fullmatch(age_text):
        raise MtaStsPolicyError(f"invalid max_age {age_text!r}")
    max_age = min(int(age_text), max_age_limit, MAX_AGE_LIMIT)
    if not mx and mode is not StsMode.NONE:
        raise MtaStsPolicyError("no mx pattern in a policy whose mode is not none")
    return StsPolicy(mode, max_age, tuple(mx))


# --- HTTPS fetch ------------------------------------------------------------------------


def policy_host(domain: str) -> str:
    return "mta-sts." + domain


def make_tls_context(cafile: str | None) -> ssl.SSLContext:
    """PKIX client context: chain to a trusted root, host name check, TLS 1.2+ (RFC 8461 section 3.3)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def _read_chunked(reader: asyncio.StreamReader, cap: int) -> bytes:
    body = bytearray()
    while True:
        line = await reader.readline()
        if not line:
            raise MtaStsFetchError("connection closed inside a chunked body")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise MtaStsFetchError(f"bad chunk size {size_text[:20]!r}") from None
        if size == 0:
            return bytes(body)
        if len(body) + size > cap:
            raise MtaStsTooLargeError(f"policy body larger than {cap} bytes")
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _read_until_eof(reader: asyncio.StreamReader, cap: int) -> bytes:
    body = bytearray()
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > cap:
            raise MtaStsTooLargeError(f"policy body larger than {cap} bytes")


async def _http_get(host: str, address: str, settings: StsSettings, ctx: ssl.SSLContext) -> str:
    reader, writer = await asyncio.open_connection(
        address, settings.https_port, ssl=ctx, server_hostname=host,
        ssl_handshake_timeout=settings.fetch_timeout, limit=settings.max_header_size)
    try:
        writer.write(
            f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {settings.user_agent}\r\n"
            "Accept: text/plain\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n".encode("ascii"))
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise MtaStsFetchError("HTTP response header too large") from None
        except asyncio.IncompleteReadError:
            raise MtaStsFetchError("connection closed before the HTTP response header ended") from None
        lines = head.decode("iso-8859-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or not status[0].startswith("HTTP/1.") or not status[1].isdigit():
            raise MtaStsFetchError(f"malformed HTTP status line {lines[0][:80]!r}")
        code = int(status[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise MtaStsFetchError(f"malformed HTTP header line {line[:80]!r}")
            headers.setdefault(name.strip().lower(), value.strip())
        if 300 <= code < 400:
            raise MtaStsRedirectError(
                f"HTTP {code} redirect to {headers.get('location', '?')!r} (RFC 8461 section 3.3: not followed)")
        if code != 200:
            raise MtaStsHttpStatusError(f"HTTP status {code}")
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "text/plain":
            raise MtaStsMediaTypeError(f"media type {media or 'missing'!r}, not text/plain")
        cap = settings.max_body_size
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader, cap)
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise MtaStsFetchError("bad Content-Length") from None
            if length > cap:
                raise MtaStsTooLargeError(f"policy body of {length} bytes is larger than {cap} bytes")
            body = await reader.readexactly(length)
        else:
            body = await _read_until_eof(reader, cap)
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MtaStsPolicyError(f"policy is not UTF-8: {e}") from e
    except BaseException:
        # on any failure (cancellation by the timeout included) drop the connection at once:
        # a graceful TLS close could wait on a stalled server far beyond our timeout
        writer.transport.abort()
        raise
    finally:
        if not writer.transport.is_closing():
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2.0)


async def fetch_policy_text(domain: str, addresses: Sequence[str], settings: StsSettings,
                            ctx: ssl.SSLContext | None = None) -> str:
    """Fetch the policy body from the first address that answers (RFC 8461 section 3.3).

    A transport failure on one address moves on to the next; an HTTP-level
    answer (redirect, wrong status, size, media type) is final.
    """
    host = policy_host(domain)
    if not addresses:
        raise MtaStsFetchError(f"{host} has no address")
    ctx = ctx or make_tls_context(settings.cafile)
    errors: list[str] = []
    deadline = asyncio.get_running_loop().time() + settings.fetch_timeout
    for address in addresses:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            break
        try:
            return await asyncio.wait_for(_http_get(host, address, settings, ctx), remaining)
        except ssl.SSLCertVerificationError as e:
            raise MtaStsTlsError(f"{host} [{address}]: certificate not valid: {e.verify_message}") from e
        except ssl.SSLError as e:
            raise MtaStsTlsError(f"{host} [{address}]: TLS failure: {e}") from e
        except TimeoutError:
            errors.append(f"[{address}]: timeout")
        except asyncio.IncompleteReadError:
            errors.append(f"[{address}]: connection closed early")
        except OSError as e:
            errors.append(f"[{address}]: {e.strerror or e}")
    if errors and all(e.endswith("timeout") for e in errors):
        raise MtaStsTimeoutError(f"{host}: fetch timed out: " + "; ".join(errors))
    raise MtaStsFetchError(f"{host}: " + ("; ".join(errors) or "fetch timed out"))


# --- resolver with cache ------------------------------------------------------------------


@dataclass
class _Loaded:
    policy: StsPolicy | None
    ok: bool


@dataclass
class StsResolver:
    """MTA-STS policy discovery with caching and refresh (RFC 8461 sections 3.3 and 5)."""

    dns: DnsClient
    settings: StsSettings = field(default_factory=StsSettings)
    cache: Cache = field(default_factory=MemoryCache)
    clock: Callable[[], float] = time.time
    _flight: SingleFlight[StsPolicy] = field(default_factory=SingleFlight, repr=False)
    _mirror: dict[str, StsPolicy] = field(default_factory=dict, repr=False)
    _background: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)

    # cache ---------------------------------------------------------------------------
    async def _load(self, domain: str) -> _Loaded:
        mirror = self._mirror.get(domain)
        try:
            raw = await self.cache.get("sts:" + domain)
        except CacheError as e:
            log.warning("domain=%s, cache_error=%s", domain, e)
            ok, policy = False, mirror
        else:
            ok = True
            try:
                policy = StsPolicy.from_dict(json.loads(raw)) if raw is not None else mirror
            except (ValueError, KeyError, TypeError) as e:
                log.warning("domain=%s, cache_entry_invalid=%s", domain, e)
                policy = mirror
        if policy is not None and policy.expires_at <= self.clock():
            self._mirror.pop(domain, None)
            return _Loaded(None, ok)
        return _Loaded(policy, ok)

    async def _store(self, domain: str, policy: StsPolicy) -> None:
        self._mirror[domain] = policy
        if isinstance(self.cache, MemoryCache):
            return  # the in-memory copy is the cache: a second copy in the same process would only cost memory
        ttl = policy.expires_at - self.clock()
        try:
            if ttl > 0:
                await self.cache.set("sts:" + domain, json.dumps(policy.to_dict()).encode(), ttl)
            else:
                await self.cache.delete("sts:" + domain)
        except CacheError as e:
            log.warning("domain=%s, cache_error=%s", domain, e)

    async def _failed_recently(self, domain: str, record_id: str) -> str | None:
        try:
            raw = await self.cache.get(f"stsfail:{domain}:{record_id}")
        except CacheError:
            return None
        return raw.decode("utf-8", "replace") if raw is not None else None

    async def _remember_failure(self, domain: str, record_id: str, error: str) -> None:
        try:
            await self.cache.set(f"stsfail:{domain}:{record_id}", error.encode(), self.settings.retry_after_failure)
        except CacheError as e:
            log.warning("domain=%s, cache_error=%s", domain, e)

    # fetch ---------------------------------------------------------------------------
    async def fetch(self, domain: str, record_id: str) -> StsPolicy:
        """Fetch and parse the policy now (no cache); raises an :class:`MtaStsError`."""
        host = policy_host(domain)
        addrs: list[str] = []
        errors: list[str] = []
        for answer in await self.dns.query_many(host, ("A", "AAAA")):
            if answer.status is LookupStatus.ANSWER and answer.state.trustworthy:
                addrs.extend(answer.rdata)
            elif answer.status is LookupStatus.ERROR:
                errors.append(f"{answer.rdtype}: {answer.state.value} {answer.error}")
        if not addrs:
            raise MtaStsFetchError(f"{host}: no address ({'; '.join(errors) or 'no A/AAAA record'})")
        text = await fetch_policy_text(domain, addrs, self.settings)
        policy = parse_policy(text, self.settings.max_age_limit)
        return replace(policy, policy_id=record_id, fetched_at=self.clock())

    async def _fetch_and_store(self, domain: str, record_id: str) -> StsPolicy:
        policy = await self.fetch(domain, record_id)
        await self._store(domain, policy)
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
        loaded = await self._load(domain)
        cached = loaded.policy
        if record is None:
            if cached is not None:
                return StsResult(domain, StsStatus.CACHED_NO_RECORD, cached, None, detail)
            return StsResult(domain, status, None, None, detail)
        if cached is not None and cached.policy_id == record.id:
            self._maybe_refresh(domain, cached)
            return StsResult(domain, StsStatus.CACHED, cached, record.id)
        recent = await self._failed_recently(domain, record.id)
        if recent is None:
            try:
                policy = await self._flight.run(f"{domain}:{record.id}",
                                                lambda: self._fetch_and_store(domain, record.id))
                return StsResult(domain, StsStatus.FETCHED, policy, record.id)
            except MtaStsError as e:
                recent = f"{type(e).__name__}: {e}"
                log.warning("domain=%s, sts_id=%s, fetch_error=%s", domain, record.id, recent)
                await self._remember_failure(domain, record.id, recent)
        if cached is not None:
            return StsResult(domain, StsStatus.CACHED_FETCH_FAILED, cached, record.id, recent)
        if not loaded.ok:
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
        cached = (await self._load(domain)).policy
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
        try:
            keys = await self.cache.keys("sts:")
        except CacheError as e:
            log.warning("proactive refresh: cache_error=%s", e)
            keys = []
        domains = {k[4:] for k in keys} | set(self._mirror)
        count = 0
        for domain in sorted(domains):
            policy = (await self._load(domain)).policy
            if policy is not None and self.refresh_due(policy):
                await self.refresh(domain)
                count += 1
        return count

    async def wait_background(self) -> None:
        """Wait for proactive refreshes started by :meth:`resolve` (tests, shutdown)."""
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
