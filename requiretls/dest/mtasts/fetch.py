"""MTA-STS policy fetch (RFC 8461 section 3.3): ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``.

The rules of section 3.3 live here once, whichever HTTP client does the GET:

* connect to an address our DNSSEC-aware resolver returned (never the system resolver), with SNI and a PKIX
  certificate check for ``mta-sts.DOMAIN`` (TLS 1.2 or later);
* status 200 only; a redirect is an error and is never followed;
* media type ``text/plain``;
* the body is capped (64 KiB by default) while it is read, whatever its framing (Content-Length, chunked, or
  up to the end of the connection): reading stops at the cap;
* one overall timeout for the whole fetch, all addresses included.

An :data:`HttpGet` does one GET on one address and returns the body; :class:`PolicyFetcher` runs the address
loop and maps failures onto the :class:`~requiretls.dest.errors.MtaStsFetchError` family: a transport failure
on one address (``OSError``, ``TimeoutError``) moves on to the next, an HTTP-level answer is final.
:func:`http11_get` is the built-in HTTP/1.1 client.  An aiohttp client behind the same interface passed the same
tests on aiohttp 3.8 and 3.14 but cost 25% more CPU per fetch and 8 MB more memory (docs/benchmarks.md, "MTA-STS
fetch"), so the built-in one stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Sequence

from ..errors import (
    MtaStsFetchError,
    MtaStsHttpStatusError,
    MtaStsMediaTypeError,
    MtaStsPolicyError,
    MtaStsRedirectError,
    MtaStsTimeoutError,
    MtaStsTlsError,
    MtaStsTooLargeError,
)
from .settings import StsSettings

POLICY_PATH = "/.well-known/mta-sts.txt"

#: One GET of :data:`POLICY_PATH` from ``host`` at ``address``: returns the body (at most
#: ``settings.max_body_size`` bytes) or raises; ``OSError`` / ``TimeoutError`` / ``ssl.SSLError`` for transport
#: failures, :class:`MtaStsFetchError` subclasses for HTTP-level ones (via :func:`check_head`).
HttpGet = Callable[[str, str, StsSettings, ssl.SSLContext], Awaitable[bytes]]


def policy_host(domain: str) -> str:
    return "mta-sts." + domain


def make_tls_context(cafile: str | None) -> ssl.SSLContext:
    """PKIX client context: chain to a trusted root, host name check, TLS 1.2+ (RFC 8461 section 3.3)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def check_head(code: int, location: str | None, content_type: str | None) -> None:
    """The status and media-type rules of RFC 8461 section 3.3, before any of the body is read."""
    if 300 <= code < 400:
        raise MtaStsRedirectError(
            f"HTTP {code} redirect to {location or '?'!r} (RFC 8461 section 3.3: not followed)")
    if code != 200:
        raise MtaStsHttpStatusError(f"HTTP status {code}")
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "text/plain":
        raise MtaStsMediaTypeError(f"media type {media or 'missing'!r}, not text/plain")


def check_length(length: int, cap: int) -> None:
    if length > cap:
        raise MtaStsTooLargeError(f"policy body of {length} bytes is larger than {cap} bytes")


def too_large(cap: int) -> MtaStsTooLargeError:
    return MtaStsTooLargeError(f"policy body larger than {cap} bytes")


# --- the built-in HTTP/1.1 client ------------------------------------------------------------------------------


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
            raise too_large(cap)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _read_until_eof(reader: asyncio.StreamReader, cap: int) -> bytes:
    body = bytearray()
    while True:
        # never ask for more than one byte past the cap: that byte is enough to know the body is too large
        chunk = await reader.read(cap + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > cap:
            raise too_large(cap)


async def http11_get(host: str, address: str, settings: StsSettings, ctx: ssl.SSLContext) -> bytes:
    """One ``GET`` over HTTP/1.1 with ``Connection: close`` to ``address``, SNI and certificate name ``host``."""
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
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise MtaStsFetchError(f"malformed HTTP header line {line[:80]!r}")
            headers.setdefault(name.strip().lower(), value.strip())
        check_head(int(status[1]), headers.get("location"), headers.get("content-type"))
        cap = settings.max_body_size
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await _read_chunked(reader, cap)
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise MtaStsFetchError("bad Content-Length") from None
            check_length(length, cap)
            return await reader.readexactly(length)
        return await _read_until_eof(reader, cap)
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


# --- the address loop and the error mapping ----------------------------------------------------------------


class PolicyFetcher:
    """Fetches a policy body with one :data:`HttpGet`; keeps one TLS context per CA file (loading a trust
    store costs milliseconds, and a daemon fetches thousands of policies)."""

    def __init__(self, get: HttpGet = http11_get) -> None:
        self.get = get
        self._contexts: dict[str | None, ssl.SSLContext] = {}

    def context(self, cafile: str | None) -> ssl.SSLContext:
        ctx = self._contexts.get(cafile)
        if ctx is None:
            ctx = self._contexts[cafile] = make_tls_context(cafile)
        return ctx

    async def fetch_text(self, domain: str, addresses: Sequence[str], settings: StsSettings,
                         ctx: ssl.SSLContext | None = None) -> str:
        """The policy body of ``domain`` from the first address that answers (RFC 8461 section 3.3)."""
        host = policy_host(domain)
        if not addresses:
            raise MtaStsFetchError(f"{host} has no address")
        ctx = ctx or self.context(settings.cafile)
        errors: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.fetch_timeout
        for address in addresses:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                body = await asyncio.wait_for(self.get(host, address, settings, ctx), remaining)
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
            else:
                try:
                    return body.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise MtaStsPolicyError(f"policy is not UTF-8: {e}") from e
        if errors and all(e.endswith("timeout") for e in errors):
            raise MtaStsTimeoutError(f"{host}: fetch timed out: " + "; ".join(errors))
        raise MtaStsFetchError(f"{host}: " + ("; ".join(errors) or "fetch timed out"))


async def fetch_policy_text(domain: str, addresses: Sequence[str], settings: StsSettings,
                            ctx: ssl.SSLContext | None = None) -> str:
    """The policy body of ``domain`` through the built-in client (a fresh :class:`PolicyFetcher`)."""
    return await PolicyFetcher().fetch_text(domain, addresses, settings, ctx)
