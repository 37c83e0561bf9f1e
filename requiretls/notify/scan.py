"""One look at the queue: ``postqueue -j``, then ``postcat`` for each message with a TLS-policy deferral."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from requiretls.addresses import ListenAddress
from requiretls.config import Settings
from requiretls.notify.queue import TlsDeferred, judge, parse_postcat, parse_postqueue
from requiretls.notify.tools import PostfixTools

log = logging.getLogger("requiretls")

#: queues whose messages wait for delivery (``hold`` is the postmaster's, ``incoming`` not yet tried)
WAITING_QUEUES = frozenset({"deferred", "active"})


def tools_for(settings: Settings) -> PostfixTools:
    n = settings.notify
    return PostfixTools(n.postfix_config_dir or None, n.postfix_command_prefix)


def agent_addresses(listen: ListenAddress, queue_directory: str) -> tuple[str, ...]:
    """How Postfix names our delivery agent in a ``host X[ADDR] said:`` reason: the socket path as in its
    ``lmtp:unix:`` next hop (relative to the queue directory when under it), or the inet host."""
    text = listen.postfix(queue_directory)
    kind, _, rest = text.partition(":")
    if kind == "unix":
        return (rest,)
    host = rest.rsplit(":", 1)[0].strip("[]")
    return (host,)


@dataclass(frozen=True, slots=True)
class PostfixFacts:
    myhostname: str
    queue_directory: str
    local_domains: frozenset[str]
    mail_version: str


def postfix_facts(tools: PostfixTools) -> PostfixFacts:
    names = ("myhostname", "queue_directory", "mydestination", "virtual_alias_domains",
             "virtual_mailbox_domains", "mail_version")
    values = tools.postconf("-x", *names)
    domains: set[str] = set()
    for name in ("mydestination", "virtual_alias_domains", "virtual_mailbox_domains"):
        for item in values.get(name, "").replace(",", " ").split():
            if ":" in item or item.startswith("/"):
                log.info("notify: %s entry %s is a lookup table; not read (list its domains in "
                         "notify.sender_domains)", name, item)
                continue
            domains.add(item.lower().rstrip("."))
    return PostfixFacts(values.get("myhostname", "localhost"), values.get("queue_directory", "/var/spool/postfix"),
                        frozenset(domains), values.get("mail_version", ""))


def scan(settings: Settings, tools: PostfixTools, queue_directory: str,
         queues: frozenset[str] = WAITING_QUEUES) -> list[TlsDeferred]:
    """The TLS-deferred messages in ``queues``, oldest first.  A message that leaves the queue between
    ``postqueue`` and ``postcat`` is skipped."""
    agents = agent_addresses(settings.relay.listen, queue_directory)
    out = []
    for msg in parse_postqueue(tools.postqueue_json()):
        if msg.queue_name not in queues:
            continue
        if not any(r.delay_reason for r in msg.recipients):
            continue
        text = tools.postcat_envelope_headers(msg.queue_id)
        if text is None:
            continue
        entry = judge(msg, parse_postcat(text), settings.local_policy, agents)
        if entry is not None:
            out.append(entry)
    out.sort(key=lambda e: (e.arrival_time, e.queue_id))
    return out
