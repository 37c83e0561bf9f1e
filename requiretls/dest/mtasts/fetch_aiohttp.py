"""The policy GET of RFC 8461 section 3.3 over aiohttp (an :data:`~.fetch.HttpGet`; optional dependency).

How each rule of section 3.3 maps onto aiohttp's public API (the same on aiohttp 3.8, Debian 12's, and current
releases):

* our address, SNI and certificate name ``mta-sts.DOMAIN``: a connector whose resolver (``AbstractResolver``)
  answers with the one address our DNSSEC-aware resolver gave; aiohttp then connects there and passes the URL's
  host name as ``server_hostname`` (SNI and the name check);
* no redirects: ``allow_redirects=False``, then :func:`~.fetch.check_head` refuses the 3xx;
* body cap while streaming: Content-Length checked first, then at most ``cap + 1`` bytes are asked of the
  stream (chunked decoding is aiohttp's);
* raw bytes: no automatic decompression, ``Accept-Encoding: identity``; no proxies (``trust_env`` off);
* timeout: the caller's overall deadline (:class:`~.fetch.PolicyFetcher`).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver

from ..errors import MtaStsFetchError
from .fetch import POLICY_PATH, check_head, check_length, too_large
from .settings import StsSettings


class _PinnedResolver(AbstractResolver):
    """Resolves every name to the one address we already resolved (and validated) ourselves."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[Any]:
        fam = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        return [{"hostname": host, "host": self.address, "port": port, "family": fam, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        return None


async def aiohttp_get(host: str, address: str, settings: StsSettings, ctx: ssl.SSLContext) -> bytes:
    """One GET of the policy from ``address`` with SNI and certificate name ``host``, over aiohttp."""
    connector = aiohttp.TCPConnector(resolver=_PinnedResolver(address), ssl=ctx, use_dns_cache=False,
                                     force_close=True, limit=1)
    headers = {"User-Agent": settings.user_agent, "Accept": "text/plain", "Accept-Encoding": "identity",
               "Cache-Control": "no-cache"}
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False) as session:
        try:
            async with session.get(f"https://{host}:{settings.https_port}{POLICY_PATH}", headers=headers,
                                   allow_redirects=False) as resp:
                check_head(resp.status, resp.headers.get("Location"), resp.headers.get("Content-Type"))
                cap = settings.max_body_size
                if resp.content_length is not None:
                    check_length(resp.content_length, cap)
                body = bytearray()
                while True:
                    chunk = await resp.content.read(cap + 1 - len(body))
                    if not chunk:
                        return bytes(body)
                    body += chunk
                    if len(body) > cap:
                        raise too_large(cap)
        # aiohttp wraps the ssl and socket errors; hand the originals to PolicyFetcher's mapping
        except aiohttp.ClientConnectorCertificateError as e:
            raise e.certificate_error from e
        except aiohttp.ClientConnectorSSLError as e:
            raise e.os_error from e
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as e:
            raise ConnectionError(f"connection closed early: {e}") from e
        except aiohttp.ClientResponseError as e:  # a malformed status line or header: final, as in http11_get
            raise MtaStsFetchError(f"malformed HTTP response: {e.message}") from e
