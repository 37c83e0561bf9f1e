"""TLS-RPT (RFC 8460) for the delivery agent's own TLS sessions, in the datagram format of Postfix 3.10+.

Postfix reports each TLS session through libtlsrpt to a local collector (tlsrpt-reporter's ``tlsrpt-collectd``)
over a unix datagram socket; the collector aggregates and its ``tlsrpt-reportd`` mails the daily reports.  The
agent sends the same datagrams to the same socket (``relay.tlsrpt_socket``), so one collector reports for both.

One datagram per session, and only for a domain that publishes a TLSRPT record (``_smtp._tls.DOMAIN`` TXT,
``v=TLSRPTv1``), as Postfix does.  A datagram is JSON::

    {"dpv": "1", "d": DOMAIN, "pr": TLSRPT_RECORD,
     "policies": [{"policy-type": 1|2|9, "policy-domain": DOMAIN, "policy-string": [...], "mx-host": [...],
                   "failure-details": [{"c": CODE, "n": MX_NAME, "r": MX_IP, "a": DETAIL}], "t": N, "f": 0|1}]}

policy-type 1 is ``tlsa`` (DANE), 2 ``sts`` (MTA-STS), 9 ``no-policy-found``; failure codes 201-205 are the TLS
negotiation result types of RFC 8460 section 4.3.1, 304-306 the DNS ones; ``f`` is 1 for a failed session.
Outcomes RFC 8460 has no type for (the MX lacks REQUIRETLS, no MX may be used) are in the metrics, not here.

Sending never blocks or fails a delivery: the socket is non-blocking and any error is logged once per kind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

from requiretls.dest.dnssec import DnsClient, LookupStatus
from requiretls.facts import DaneState, Destination, SessionResult, SessionStage, TlsRequirement
from requiretls.log import kv

log = logging.getLogger("requiretls")

POLICY_TLSA, POLICY_STS, NO_POLICY_FOUND = 1, 2, 9
STARTTLS_NOT_SUPPORTED = 201
CERTIFICATE_HOST_MISMATCH = 202
CERTIFICATE_NOT_TRUSTED = 203
CERTIFICATE_EXPIRED = 204
VALIDATION_FAILURE = 205
TLSA_INVALID = 304
DNSSEC_INVALID = 305
DANE_REQUIRED = 306
#: Largest datagram sent (the collector reads up to 64 KiB; a Linux unix datagram may be up to ~200 KiB).
MAX_DATAGRAM = 60_000


def failure_code(r: SessionResult) -> int | None:
    """The RFC 8460 result type of a session that failed at TLS, 0 for a good TLS session, None when the session
    never got to TLS (connection refused, greeting or EHLO refused: nothing to report)."""
    if r.verified and r.starttls:
        return 0
    if r.stage is SessionStage.STARTTLS and not r.transient:
        return STARTTLS_NOT_SUPPORTED  # not offered, or the STARTTLS command refused
    if r.stage in (SessionStage.HANDSHAKE, SessionStage.AUTHENTICATE) and not r.transient:
        err = r.verify_error.lower()
        if err.startswith("dane"):
            return VALIDATION_FAILURE  # no TLSA record matches the chain
        if "expired" in err or "not yet valid" in err:
            return CERTIFICATE_EXPIRED
        if "mismatch" in err or "hostname" in err:
            return CERTIFICATE_HOST_MISMATCH
        if "self-signed" in err or "self signed" in err or "issuer" in err or "untrusted" in err:
            return CERTIFICATE_NOT_TRUSTED
        return VALIDATION_FAILURE
    return None


def policy(dest: Destination, r: SessionResult, code: int) -> dict[str, Any]:
    """The ``policies`` entry for one session to a host of ``dest``."""
    host = next((h for h in dest.hosts if h.name.lower().rstrip(".") == r.host.lower().rstrip(".")), None)
    domain = dest.domain.lower().rstrip(".")
    entry: dict[str, Any]
    if host is not None and host.dane is DaneState.USABLE:
        entry = {"policy-type": POLICY_TLSA, "policy-domain": domain,
                 "policy-string": [t.to_text() for t in host.usable_tlsa]}
    elif dest.requirement is TlsRequirement.STS_ENFORCE and dest.sts is not None and dest.sts.policy is not None:
        pol = dest.sts.policy
        patterns = [p.lower().rstrip(".") for p in pol.mx]
        entry = {"policy-type": POLICY_STS, "policy-domain": domain,
                 "policy-string": ["version: STSv1", f"mode: {pol.mode.value}", *(f"mx: {p}" for p in patterns),
                                   f"max_age: {pol.max_age}"],
                 "mx-host": patterns}
    else:
        entry = {"policy-type": NO_POLICY_FOUND, "policy-domain": domain}
    if code:
        detail = {"c": code, "n": r.host.rstrip("."), "r": r.address}
        text = r.verify_error or r.error
        if text:
            detail["a"] = text[:300]
        entry["failure-details"] = [detail]
    entry["t"] = 1 if code else 0
    entry["f"] = 1 if code else 0
    return entry


def datagram(domain: str, record: str, entry: dict[str, Any]) -> bytes:
    return json.dumps({"dpv": "1", "d": domain.lower().rstrip("."), "pr": record, "policies": [entry]},
                      separators=(",", ":")).encode()


class Reporter:
    """Sends the datagrams; :meth:`session` may be called from any thread (deliveries run in threads)."""

    def __init__(self, path: str, dns: DnsClient, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self.dns = dns
        self.loop = loop
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sent = 0
        self._complained: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def session(self, dest: Destination, r: SessionResult) -> None:
        code = failure_code(r)
        if code is None:
            return
        entry = policy(dest, r, code)
        self.loop.call_soon_threadsafe(self._spawn, dest.domain, entry)

    def _spawn(self, domain: str, entry: dict[str, Any]) -> None:
        task = self.loop.create_task(self._send(domain, entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def record(self, domain: str) -> str | None:
        """The domain's TLSRPT record (RFC 8460 section 3), or None: exactly one TXT starting ``v=TLSRPTv1``."""
        answer = await self.dns.query(f"_smtp._tls.{domain.rstrip('.')}", "TXT")
        if answer.status is not LookupStatus.ANSWER:
            return None
        records = [t for t in answer.rdata if t.startswith("v=TLSRPTv1")]
        return records[0] if len(records) == 1 else None

    async def _send(self, domain: str, entry: dict[str, Any]) -> None:
        try:
            rec = await self.record(domain)
            if rec is None:
                return
            data = datagram(domain, rec, entry)
            if len(data) > MAX_DATAGRAM:
                entry = {**entry, "policy-string": []}
                data = datagram(domain, rec, entry)
            self.sock.sendto(data, self.path)
            self.sent += 1
        except Exception as e:  # reporting must never disturb delivery
            kind = type(e).__name__
            if kind not in self._complained:
                self._complained.add(kind)
                log.warning("%s", kv(tlsrpt="datagram not sent", socket=self.path, error=f"{kind}: {e}",
                                     note="logged once per kind of error"))

    async def drain(self) -> None:
        """Wait for the datagrams under way (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


REPORTER: Reporter | None = None


def session(dest: Destination, r: SessionResult) -> None:
    """Report one new TLS session of the agent (no-op unless ``relay.tlsrpt_socket`` is set)."""
    if REPORTER is not None:
        REPORTER.session(dest, r)


def start(path: str, dns: DnsClient, loop: asyncio.AbstractEventLoop) -> Reporter:
    global REPORTER
    REPORTER = Reporter(path, dns, loop)
    return REPORTER
