"""What an opt-out turned off: per message, each destination whose DANE or MTA-STS policy ``TLS-Required: No``
(or the opt-out cookie) set aside, logged and counted (issue 18).

Some senders add ``TLS-Required: No`` to all their mail; the admin must see how much DANE and MTA-STS that
disables.  After the milter has answered (the message is never held for it), the recipient domains of an
opt-out message that go to their MX are looked up (the same cached lookups policyd and the agent make) and one
line is logged::

    QUEUEID: requiretls: optout_set_aside="example.org=dane,example.net=mta-sts", note="..."

and ``requiretls_milter_optout_set_aside_total{policy}`` counts each destination.  Domains Postfix sends to a
relayhost or a transport's own next hop, or delivers here, are not looked up: their MX policy was not in play.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Sequence

from requiretls.dest import DestinationResolver
from requiretls.facts import TlsRequirement
from requiretls.log import kv
from requiretls.milter import metrics as milter_metrics
from requiretls.policy.model import Decision, MessageClass
from requiretls.policy.route import Leg, RcptRoute, plan_recipient

log = logging.getLogger("requiretls")

#: At most this many domains of one message are looked up (a message to 1,000 domains is not audited whole).
MAX_DOMAINS = 50


def optout_domains(decision: Decision, routes: Sequence[RcptRoute], relayhost: str = "",
                   local_transports: frozenset[str] = frozenset()) -> list[str]:
    """The recipient domains of an opt-out message whose own MX policy Postfix would have applied."""
    optout = {r.recipient.lower() for r in decision.recipients if r.msg_class is MessageClass.OPTOUT}
    if decision.msg_class is not MessageClass.OPTOUT and not optout:
        return []
    domains: list[str] = []
    for route in routes:
        if decision.msg_class is not MessageClass.OPTOUT and route.address.lower() not in optout:
            continue
        plan = plan_recipient(route, relayhost, local_transports)
        domain = route.address.rpartition("@")[2].lower().rstrip(".")
        if plan.leg is Leg.MX and domain and domain not in domains:
            domains.append(domain)
    return domains[:MAX_DOMAINS]


def policy_of(requirement: TlsRequirement) -> str | None:
    if requirement is TlsRequirement.DANE:
        return "dane"
    if requirement is TlsRequirement.STS_ENFORCE:
        return "mta-sts"
    return None


class SetAside:
    """Runs the look-ups on ``loop`` (another thread's); :meth:`message` returns at once."""

    def __init__(self, resolver: DestinationResolver, loop: asyncio.AbstractEventLoop, timeout: float = 30.0) -> None:
        self.resolver = resolver
        self.loop = loop
        self.timeout = timeout

    def message(self, queue_id: str, domains: list[str]) -> concurrent.futures.Future[list[str]] | None:
        if not domains:
            return None
        return asyncio.run_coroutine_threadsafe(self.audit(queue_id, domains), self.loop)

    async def audit(self, queue_id: str, domains: list[str]) -> list[str]:
        async def one(domain: str) -> str | None:
            try:
                dest = await asyncio.wait_for(self.resolver.lookup(domain), self.timeout)
            except Exception:  # an audit that cannot look a domain up says nothing of it
                return None
            return policy_of(dest.requirement)

        found = [f"{d}={p}" for d, p in zip(domains, await asyncio.gather(*(one(d) for d in domains)),
                                            strict=True) if p]
        for item in found:
            milter_metrics.set_aside(item.rpartition("=")[2])
        if found:
            log.info("%s: requiretls: %s", queue_id, kv(
                optout_set_aside=",".join(found),
                note="TLS-Required: No set aside these destinations' DANE / MTA-STS policies"))
        return found


AUDIT: SetAside | None = None


def message(queue_id: str, decision: Decision, routes: Sequence[RcptRoute], relayhost: str = "",
            local_transports: frozenset[str] = frozenset()) -> None:
    if AUDIT is not None:
        AUDIT.message(queue_id, optout_domains(decision, routes, relayhost, local_transports))
