"""``requiretls release QUEUEID --optout``: the postmaster sends a TLS-deferred message on with
``TLS-Required: No``.

Steps, each written to the journal ``STATE_DIR/release.jsonl`` (fsync'd) before it is taken:

1. ``held``: ``postsuper -h`` puts the original on hold, so Postfix does not deliver it meanwhile;
2. ``submitting``: a copy goes to the re-injection smtpd (loopback, no milters) with the same envelope sender,
   the recipients still queued, RET/ENVID and each recipient's NOTIFY/ORCPT, and ``TLS-Required: No`` as its
   first header field (any earlier ``TLS-Required``/``X-Original-TLS-Required`` removed).  Postfix 3.10+
   honours the field itself (the re-injection cleanup keeps it); on 3.7-3.9 the copy also carries
   ``X-RequireTLS-Route: relaxed``, which the re-injection cleanup's release rule turns into FILTER to the
   relaxed smtp clone (and which that clone removes before sending);
3. ``queued``: Postfix answered 250 with the new queue id;
4. ``done``: ``postsuper -d`` removed the original from the hold queue.

Killed at any point, nothing is lost and nothing is sent twice: before ``submitting`` completes the original is
on hold and a new run goes on from there; after ``queued`` a new run only removes the original.  Killed while
the copy was being submitted (between ``submitting`` and ``queued``), whether Postfix queued it is unknown: a
new run refuses to guess, leaves the original on hold and says what to check (``--force`` submits again).

Refused, with the reason: REQUIRETLS messages (RFC 8689 section 4.1: never relaxed), recipients whose
destination rule says ``optout=no``, senders whose rule says ``optout=no``, ``optout_from = none``, messages
that already carry the opt-out, and messages that no TLS policy holds.
"""

from __future__ import annotations

import json
import logging
import os
import smtplib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from requiretls.addresses import Endpoint
from requiretls.log import kv
from requiretls.notify.notifier import submit
from requiretls.notify.queue import (
    OptoutVerdict,
    QueueFile,
    judge,
    parse_postcat,
    parse_postqueue,
    verdict_text,
)
from requiretls.notify.tools import PostfixTools, QueueToolError
from requiretls.policy.headers import (
    ORIGINAL_TLS_REQUIRED,
    PRIVATE_HEADERS,
    ROUTE_HEADER,
    TLS_REQUIRED,
    drop_fields,
)
from requiretls.policy.local import LocalPolicy
from requiretls.policy.route import PostfixFeatures, Route
from requiretls.policy.table import split_address

log = logging.getLogger("requiretls")

JOURNAL = "release.jsonl"
#: test hook: the step after which the command kills itself (SIGKILL), to prove the journal's recovery
KILL_ENV = "REQUIRETLS_TEST_KILL_AFTER"


class ReleaseRefused(Exception):
    """The message may not be released (the reason is the text)."""


class ReleaseError(Exception):
    """Releasing failed; the text says what state the message is in."""


class Journal:
    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        self.path = os.path.join(state_dir, JOURNAL)

    def last(self, queue_id: str) -> dict[str, Any] | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return None
        found = None
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line from a crash: ignored
            if isinstance(rec, dict) and rec.get("old") == queue_id:
                found = rec
        return found

    def write(self, queue_id: str, step: str, **extra: Any) -> None:
        os.makedirs(self.dir, mode=0o750, exist_ok=True)
        rec = {"old": queue_id, "step": step, "at": time.time(), **extra}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        kill_at = os.environ.get(KILL_ENV)
        if kill_at == step:
            os.kill(os.getpid(), 9)


def rewrite_message(raw: bytes, route_relaxed: bool) -> bytes:
    """The copy: ``TLS-Required: No`` first; earlier TLS-Required fields and our private fields removed;
    ``X-RequireTLS-Route: relaxed`` for Postfix < 3.10."""
    head, sep, body = raw.partition(b"\n\n")
    if not sep:
        head, sep, body = raw, b"", b""
    kept = drop_fields(head, (TLS_REQUIRED, ORIGINAL_TLS_REQUIRED, *PRIVATE_HEADERS))
    first = [f"{TLS_REQUIRED}: No".encode()]
    if route_relaxed:
        first.append(f"{ROUTE_HEADER}: {Route.RELAXED}".encode())
    return b"\n".join(first + kept) + b"\n\n" + body if sep else b"\n".join(first + kept) + b"\n"


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    old: str
    new: str
    recipients: tuple[str, ...]


Connect = Callable[[], smtplib.SMTP]


def _wait_queue(tools: PostfixTools, queue_id: str, want: str, timeout: float) -> str | None:
    """Poll until the message is in queue ``want``; its queue name at the end (None: gone)."""
    end = time.monotonic() + timeout
    name: str | None = None
    while True:
        name = next((m.queue_name for m in parse_postqueue(tools.postqueue_json()) if m.queue_id == queue_id), None)
        if name == want or name is None or time.monotonic() > end:
            return name
        time.sleep(0.2)


def check_releasable(queue_id: str, tools: PostfixTools, policy: LocalPolicy, agents: Sequence[str],
                     held_by_us: bool = False) -> tuple[QueueFile, tuple[str, ...]]:
    """Refuse (``ReleaseRefused``) unless the message waits because of TLS policy and the opt-out is allowed for
    every recipient still queued; the queue file and those recipients."""
    msg = next((m for m in parse_postqueue(tools.postqueue_json()) if m.queue_id == queue_id), None)
    if msg is None:
        raise ReleaseRefused(f"{queue_id}: no such message in the queue")
    text = tools.postcat_envelope_headers(queue_id)
    if text is None:
        raise ReleaseRefused(f"{queue_id}: the message left the queue")
    qf = parse_postcat(text)
    entry = judge(msg, qf, policy, agents)
    if entry is None and not (held_by_us and msg.queue_name == "hold"):
        raise ReleaseRefused(f"{queue_id}: not deferred because of TLS policy (nothing to opt out of)")
    if entry is not None:
        for r in entry.recipients:
            if r.optout is not OptoutVerdict.ALLOWED:
                extra = f" ({r.rule})" if r.rule else ""
                raise ReleaseRefused(f"{queue_id}: <{r.address}>: {verdict_text(r.optout)}{extra}")
    # recipients deferred for other reasons go along with the copy: their destinations must allow it too
    for q in msg.recipients:
        rule = policy.table.lookup_domain(split_address(q.address)[1])
        if rule is not None and rule.optout is False:
            raise ReleaseRefused(f"{queue_id}: <{q.address}>: {verdict_text(OptoutVerdict.DESTINATION)} "
                                 f"({rule.filename}:{rule.line})")
    rcpts = tuple(r.address for r in msg.recipients)
    if not rcpts:
        raise ReleaseRefused(f"{queue_id}: no recipient left to deliver")
    return qf, rcpts


def release(queue_id: str, *, tools: PostfixTools, policy: LocalPolicy, journal: Journal, reinject: Endpoint,
            agents: Sequence[str] = (), force: bool = False, hold_timeout: float = 30.0,
            connect: Connect | None = None) -> ReleaseResult:
    last = journal.last(queue_id)
    step = last.get("step") if last else None
    if step == "done" and last is not None:
        raise ReleaseRefused(f"{queue_id}: already released as {last.get('new')} (journal {journal.path})")
    if step == "queued" and last is not None:
        return _finish(queue_id, str(last.get("new", "")), tuple(last.get("recipients", ())), tools, journal)
    if step == "submitting" and not force:
        raise ReleaseError(
            f"{queue_id}: a previous release stopped while the copy was being submitted; whether Postfix queued "
            f"it is unknown. The original is on hold. Look for 'requiretls' lines with old={queue_id} and for the "
            f"message's Message-ID in the mail log: if a copy was queued or delivered, remove the original "
            f"(postsuper -d {queue_id} hold); if not, run this command again with --force")
    values = tools.postconf("-x", "mail_version", "relayhost")
    native = PostfixFeatures.from_macro(values.get("mail_version", "")).native_tls_required
    if not native and values.get("relayhost"):
        raise ReleaseRefused(
            f"{queue_id}: Postfix {values.get('mail_version')} has no TLS-Required: No of its own; release sends "
            f"the copy to each recipient's MX through the relaxed smtp clone, which would bypass relayhost "
            f"{values['relayhost']}: have the sender resend with the opt-out instead")
    qf, rcpts = check_releasable(queue_id, tools, policy, agents, held_by_us=step in ("held", "submit-failed"))
    journal.write(queue_id, "held")
    tools.postsuper("-h", queue_id)
    where = _wait_queue(tools, queue_id, "hold", hold_timeout)
    if where is None:
        raise ReleaseError(f"{queue_id}: the message left the queue while being put on hold (delivered or "
                           "bounced meanwhile); nothing was released")
    if where != "hold":
        raise ReleaseError(f"{queue_id}: still in the {where} queue after {hold_timeout:g} s: not released; "
                           f"retry later (postqueue -j shows it)")
    raw = tools.postcat_message(queue_id)
    if raw is None:
        raise ReleaseError(f"{queue_id}: cannot read the held message (postcat); it stays on hold")
    data = rewrite_message(raw, route_relaxed=not native)
    options = qf.mail_options()
    if any(b >= 0x80 for b in data):
        options.append("BODY=8BITMIME")
    if any(not a.isascii() for a in (qf.sender, *rcpts)):
        options.append("SMTPUTF8")
    journal.write(queue_id, "submitting", recipients=list(rcpts))
    try:
        conn = connect() if connect else smtplib.SMTP(reinject.host, reinject.port, timeout=60,
                                                      local_hostname="localhost")
        with conn as s:
            new_id = submit(s, qf.sender, rcpts, data, options, lambda r: qf.dsn_for(r).rcpt_options())
    except (OSError, smtplib.SMTPException) as e:
        # Refused or no connection before the end of DATA: nothing queued.  The original goes back.
        journal.write(queue_id, "submit-failed", error=str(e))
        tools.postsuper("-H", queue_id)
        raise ReleaseError(f"{queue_id}: the re-injection smtpd {reinject} did not take the copy ({e}); the "
                           "original is back in the queue") from e
    journal.write(queue_id, "queued", new=new_id, recipients=list(rcpts))
    log.info("%s: release: %s", queue_id, kv(old=queue_id, new=new_id, optout="TLS-Required: No",
                                              recipients=len(rcpts), status="queued"))
    return _finish(queue_id, new_id, rcpts, tools, journal)


def _finish(queue_id: str, new_id: str, rcpts: tuple[str, ...], tools: PostfixTools,
            journal: Journal) -> ReleaseResult:
    try:
        tools.postsuper("-d", queue_id, "hold")
    except QueueToolError as e:
        raise ReleaseError(f"{queue_id}: the copy {new_id} is queued but the original could not be removed "
                           f"from hold ({e}); remove it: postsuper -d {queue_id} hold") from e
    journal.write(queue_id, "done", new=new_id)
    log.info("%s: release: %s", queue_id, kv(old=queue_id, new=new_id, status="released"))
    return ReleaseResult(queue_id, new_id, rcpts)
