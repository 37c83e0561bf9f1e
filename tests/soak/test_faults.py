"""Fault injection through Postfix 3.7 with the whole plugin (milter, delivery agent, policyd via
``smtp_tls_policy_maps``): a run of mixed messages during which the milter, policyd and the agent are each
killed with SIGKILL and restarted, the resolver answers SERVFAIL for toggle.test, and dane.test's MX cuts
DATA transactions (the testbed's data-cut fault: 354, part of the message read, never the final dot, then a
TCP reset without a reply and without a delivery) from Postfix's own smtp client and from the agent.

At the end every message is delivered exactly once or bounced with the right code, the queue is empty, and
no message went out under a weaker policy than its class.  Counts are printed.  RTLS_SOAK_MESSAGES (default
1000) sets the size, RTLS_SOAK_SECONDS (60) the time over which submissions are paced; the whole run is
bounded by RTLS_SOAK_DEADLINE seconds (default 900).  ``make test`` and ``make soak`` run it (RTLS_SOAK=1).
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.e2e.plugin import Plugin
from tests.testbed.bed import Bed
from tests.testbed.postfix import Postfix
from tests.testbed.records import CutRule

pytestmark = [
    pytest.mark.soak, pytest.mark.e2e, pytest.mark.testbed,
    pytest.mark.skipif(os.environ.get("RTLS_SOAK") != "1", reason="fault injection runs in make soak (RTLS_SOAK=1)"),
]

N = int(os.environ.get("RTLS_SOAK_MESSAGES", "1000"))
DEADLINE = float(os.environ.get("RTLS_SOAK_DEADLINE", "900"))
SECONDS = float(os.environ.get("RTLS_SOAK_SECONDS", "60"))  # submissions are paced over this long
ALICE, RT = "alice@sender.test", "rt@sender.test"
POSTFIX_HELO, AGENT_HELO = "postfix.local.test", "relay.local.test"  # myhostname; the agent's helo_name
CUTS_EACH = max(3, N // 50)  # DATA transactions to mx.dane.test cut per client (Postfix's smtp, the agent)
BIG_CUTS_EACH = max(2, N // 500)  # ... and of big messages, cut while the client is still sending the body
BIG_BODY = ("y" * 76 + "\r\n") * 64_000  # 5 MB: more than the sender's TCP buffer can take (tcp_wmem max 4 MB)


@dataclass(frozen=True)
class Kind:
    name: str
    sender: str
    rcpt: str
    mx: str  # MX key that must get it, "" if it must bounce
    headers: tuple[tuple[str, str], ...] = ()
    bounce: str = ""  # expected DSN status


KINDS = [
    Kind("default->dane", ALICE, "bob@dane.test", "dane"),
    Kind("optout->dane-nostarttls", ALICE, "bob@dane-nostarttls.test", "dane-nostarttls", (("TLS-Required", "No"),)),
    Kind("requiretls(sender rule)->dane", RT, "carol@dane.test", "dane"),
    Kind("requiretls(table)->dane-norequiretls", ALICE, "bob@dane-norequiretls.test", "", bounce="5.7.30"),
    Kind("requiretls(table)->toggle", ALICE, "bob@toggle.test", "toggle"),
]


@pytest.fixture
def plugin(bed: Bed) -> Iterator[Plugin]:
    pf: Postfix = bed.postfix("3.7")
    if pf.running:
        pf.stop()
    pf.reset()
    bed.clear_mx()
    bed.dns.flush()
    p = Plugin(bed, pf, apply_args=("--policyd",))
    p.table = "dane-norequiretls.test requiretls=yes\ntoggle.test requiretls=yes\n"
    p.senders = f"{RT} requiretls=yes\n"
    try:
        yield p
    finally:
        p.stop()
        pf.stop()
        bed.dns.set_servfail("toggle.test", False)


BIG_EVERY = max(2, min(20, N // 50))


def _big(i: int) -> bool:
    """One in BIG_EVERY (20 from 1,000 messages on) of the messages for mx.dane.test (both classes) is big, for a
    recipient "big...": a few of each class arrive while the cuts are armed, whatever N."""
    return KINDS[i % len(KINDS)].mx == "dane" and (i // len(KINDS)) % BIG_EVERY == 1


def _rcpt(i: int) -> str:
    return ("big" if _big(i) else "") + KINDS[i % len(KINDS)].rcpt


def _message(i: int, kind: Kind) -> str:
    extra = "".join(f"{n}: {v}\r\n" for n, v in kind.headers)
    return (f"From: {kind.sender}\r\nTo: {_rcpt(i)}\r\nSubject: soak {i}\r\nX-Soak-Id: {i}\r\n{extra}"
            f"Message-ID: <soak.{i}.{time.time_ns()}@sender.test>\r\n\r\nsoak body {i}\r\n" + "x" * 2000 + "\r\n"
            + (BIG_BODY if _big(i) else ""))


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.submitted = 0
        self.retries: Counter[str] = Counter()
        self.faults: list[str] = []

    def retry(self, why: str) -> None:
        with self.lock:
            self.retries[why] += 1


def _submit(pf: Postfix, i: int, stats: Stats, started: float, end: float) -> None:
    kind = KINDS[i % len(KINDS)]
    time.sleep(max(0.0, started + i * SECONDS / N - time.monotonic()))
    while True:
        try:
            pf.submit(kind.sender, [_rcpt(i)], _message(i, kind), timeout=30)
            with stats.lock:
                stats.submitted += 1
            return
        except smtplib.SMTPResponseException as e:
            if not 400 <= e.smtp_code < 500:
                raise
            stats.retry(f"{e.smtp_code}")
        except (smtplib.SMTPServerDisconnected, ConnectionError, TimeoutError) as e:
            stats.retry(type(e).__name__)
        if time.monotonic() > end:
            raise TimeoutError(f"message {i} not accepted before the deadline")
        time.sleep(0.3)


def _kill(plugin: Plugin, name: str, down: float, stats: Stats) -> None:
    proc = plugin.procs.pop(name)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    stats.faults.append(f"kill -9 {name} (pid {proc.pid}) at {stats.submitted} submitted, down {down:.0f}s")
    time.sleep(down)
    plugin.start_daemon(name)


def _servfail(plugin: Plugin, seconds: float, stats: Stats) -> None:
    stats.faults.append(f"SERVFAIL toggle.test at {stats.submitted} submitted for {seconds:.0f}s")
    with plugin.bed.dns.servfail("toggle.test"):
        time.sleep(seconds)
    plugin.bed.dns.flush()


def _cut_mx(bed: Bed, seconds: float, stats: Stats) -> None:
    """mx.dane.test cuts every 2nd DATA transaction of Postfix's smtp client (default class) and of the agent
    (requiretls class) mid-message, CUTS_EACH times each, or until ``seconds`` have passed."""
    mx = bed.mx("dane")
    before = len(mx.cuts())
    mx.cut_data(CutRule(BIG_CUTS_EACH, helo=POSTFIX_HELO, rcpt_prefix="big", after_bytes=16384),
                CutRule(BIG_CUTS_EACH, helo=AGENT_HELO, rcpt_prefix="big", after_bytes=16384),
                CutRule(CUTS_EACH, every=2, helo=POSTFIX_HELO, after_bytes=1500),
                CutRule(CUTS_EACH, every=2, helo=AGENT_HELO, after_bytes=1500))
    end = time.monotonic() + seconds
    try:
        while len(mx.cuts()) - before < 2 * (CUTS_EACH + BIG_CUTS_EACH) and time.monotonic() < end:
            time.sleep(0.2)
    finally:
        mx.cut_data()
    stats.faults.append(f"mx.dane.test cut DATA mid-message (every 2nd, up to {CUTS_EACH} per client, and "
                        f"{BIG_CUTS_EACH} big ones per client) for "
                        f"{seconds - max(0.0, end - time.monotonic()):.0f}s: {len(mx.cuts()) - before} cut")


def _faults(plugin: Plugin, stats: Stats, started: float) -> list[threading.Thread]:
    """Each fault in its own thread at its moment of the paced run, so that every one hits mail in flight."""
    steps: list[tuple[float, Callable[[], None]]] = [
        (0.10, lambda: _kill(plugin, "milter", 3, stats)),
        (0.25, lambda: _kill(plugin, "policyd", 5, stats)),
        (0.40, lambda: _kill(plugin, "relay", 5, stats)),
        (0.55, lambda: _servfail(plugin, 20, stats)),
        (0.70, lambda: _cut_mx(plugin.bed, 30, stats)),
    ]

    def at(when: float, step: Callable[[], None]) -> None:
        time.sleep(max(0.0, started + when * SECONDS - time.monotonic()))
        step()

    threads = [threading.Thread(target=at, args=s, daemon=True) for s in steps]
    for t in threads:
        t.start()
    return threads


def _soak_id(raw: bytes) -> int | None:
    m = re.search(rb"^X-Soak-Id: (\d+)", raw, re.MULTILINE)
    return int(m.group(1)) if m else None


def _reason(text: str) -> str:
    """A deferral reason without the ids, addresses and numbers that make each one unique."""
    text = re.sub(r"\[[0-9.:]+\](:\d+)?", "", text)
    text = re.sub(r"\d+", "N", text)
    return text[:110]


def _status(raw: bytes) -> list[str]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [b.get("Status") for p in msg.walk() if p.get_content_type() == "message/delivery-status"
            for b in p.get_payload() if b.get("Status")]


def test_faults_during_a_mixed_run_lose_nothing_and_weaken_nothing(plugin: Plugin, bed: Bed) -> None:
    started = time.monotonic()
    end = started + DEADLINE
    plugin.start(daemons=("milter", "relay", "policyd"))
    pf = plugin.pf
    stats = Stats()
    run_start = time.monotonic()
    faults = _faults(plugin, stats, run_start)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: _submit(pf, i, stats, run_start, end), range(N)))
    for t in faults:
        t.join(max(1.0, end - time.monotonic()))
    submitted_at = time.monotonic()
    assert stats.submitted == N and len(stats.faults) == 5, stats.faults

    keys = {"dane", "dane-nostarttls", "dane-norequiretls", "toggle", "sender"}
    want = {k: sum(1 for i in range(N) if KINDS[i % len(KINDS)].mx == k) for k in keys}
    want["sender"] = sum(1 for i in range(N) if KINDS[i % len(KINDS)].bounce)
    flushes = 0
    while True:
        got = {k: len(bed.mx(k).deliveries()) for k in keys}
        # Done when the queue is empty and every message has landed somewhere (a wrong landing is judged below).
        if pf.queue_empty() and sum(got.values()) >= sum(want.values()):
            break
        if time.monotonic() > end:
            pytest.fail(f"not done by the deadline: queue {len(pf.queue_ids())}, got {got}, want {want}")
        pf.flush()
        flushes += 1
        time.sleep(3)
    time.sleep(2)  # anything late (a duplicate) still lands before we count

    seen: Counter[int] = Counter()
    weaker: list[str] = []
    bounced: dict[int, list[str]] = {}
    per_kind: Counter[str] = Counter()
    for key in keys - {"sender"}:
        for d in bed.mx(key).deliveries():
            i = _soak_id(d.raw)
            assert i is not None, d.raw[:300]
            kind = KINDS[i % len(KINDS)]
            seen[i] += 1
            per_kind[f"{kind.name}: delivered"] += 1
            if kind.mx != key:
                weaker.append(f"{i} ({kind.name}) delivered to {key}")
            if kind.name.startswith("requiretls") and not (d.tls and d.requiretls):
                weaker.append(f"{i} ({kind.name}) without REQUIRETLS over TLS: tls={d.tls} opts={d.mail_options}")
            if kind.name == "default->dane" and not d.tls:
                weaker.append(f"{i} ({kind.name}) without TLS")
    for d in bed.mx("sender").deliveries():
        assert d.mail_from in ("", "<>"), d.mail_from
        i = _soak_id(d.raw)
        assert i is not None, d.raw[:600]
        bounced.setdefault(i, []).extend(_status(d.raw))
        per_kind[f"{KINDS[i % len(KINDS)].name}: bounced {'/'.join(_status(d.raw))}"] += 1
        assert b"soak body" not in d.raw  # headers only (RFC 8689 §5)
    cuts = bed.mx("dane").cuts()
    cut_by_client = Counter((c.helo, "big" if c.rcpt_tos[0].startswith("big") else "small") for c in cuts)
    cut_ids = [_soak_id(c.partial) for c in cuts]
    # A reused connection (Postfix's connection cache, the agent's pool) may have delivered messages before the
    # one it was cut in; the cut is always its last command and happens once.
    cut_conns = [c for c in bed.mx("dane").connections() if any(x.startswith("CUT after") for x in c.commands)]
    assert all(c.commands[-1].startswith("CUT after") for c in cut_conns), [c.commands for c in cut_conns][:3]
    assert all(sum(x.startswith("CUT after") for x in c.commands) == 1 for c in cut_conns)
    log = pf.log()
    deferred = Counter(_reason(m) for m in re.findall(r"status=deferred \((.*)\)$", log, re.MULTILINE))
    lost_while = Counter(re.findall(r"to=<(?:big)?bob@dane\.test>.*status=deferred \(lost connection with "
                                    r"mx\.dane\.test\[127\.0\.2\.1\] while sending ([a-z ]+)", log))

    print(f"\nsoak: {N} messages through Postfix {pf.version} in {submitted_at - started:.0f}s of submission, "
          f"{time.monotonic() - started:.0f}s in all, {flushes} queue flushes")
    print(f"  submission retries: {dict(stats.retries)} ({sum(stats.retries.values())} in all)")
    for f in stats.faults:
        print(f"  fault: {f}")
    print(f"  cut mid-DATA by mx.dane.test: {len(cuts)} ("
          + ", ".join(f"{h} {size}: {n}" for (h, size), n in sorted(cut_by_client.items()))
          + f"), final dot read: {sum(c.dot_seen for c in cuts)}, bytes read "
          f"{min((c.bytes_read for c in cuts), default=0)}-{max((c.bytes_read for c in cuts), default=0)}, "
          f"connections recorded as cut: {len(cut_conns)}")
    print(f"  Postfix smtp deferrals for a lost connection to mx.dane.test: {dict(lost_while)}")
    print(f"  Postfix deferrals: {sum(deferred.values())} in all")
    for why, n in deferred.most_common(12):
        print(f"    {n:5d} {why}")
    for k, v in sorted(per_kind.items()):
        print(f"  {k}: {v}")

    dupes = sorted(i for i, c in seen.items() if c > 1)
    lost = [i for i in range(N) if not KINDS[i % len(KINDS)].bounce and seen[i] == 0]
    wrong_bounce = [i for i in range(N) if KINDS[i % len(KINDS)].bounce and
                    (bounced.get(i) != [KINDS[i % len(KINDS)].bounce] or seen[i])]
    stray = sorted(i for i in bounced if not KINDS[i % len(KINDS)].bounce)
    print(f"  duplicates: {len(dupes)}, lost: {len(lost)}, wrong or missing bounce: {len(wrong_bounce)}, "
          f"unexpected bounces: {len(stray)}, weaker than class: {len(weaker)}, queue empty: {pf.queue_empty()}")
    # The data-cut fault really hit both clients, only before the final dot, and each cut message was then
    # delivered exactly once (a cut before the dot leaves no room for an RFC 5321 6.1 duplicate).
    assert all(cut_by_client[h, size] > 0 for h in (POSTFIX_HELO, AGENT_HELO) for size in ("big", "small")), \
        cut_by_client
    assert not any(c.dot_seen for c in cuts)
    # A big message is cut while Postfix's smtp client is still writing its body (5 MB > its TCP send buffer).
    assert lost_while["message body"] >= 1, lost_while
    assert None not in cut_ids, [c.partial[:600] for c, i in zip(cuts, cut_ids, strict=True) if i is None][:3]
    for c, i in zip(cuts, cut_ids, strict=True):
        assert i is not None
        kind = KINDS[i % len(KINDS)]
        assert kind.mx == "dane" and c.tls, (i, kind.name, c)
        assert c.helo == (AGENT_HELO if kind.name.startswith("requiretls") else POSTFIX_HELO), (i, kind.name, c.helo)
        assert seen[i] == 1, (i, kind.name, seen[i])
    assert len(cut_conns) == len(cuts)
    assert not weaker, weaker[:20]
    assert not lost, lost[:20]
    assert not dupes, dupes[:20]
    assert not wrong_bounce, [(i, bounced.get(i)) for i in wrong_bounce[:20]]
    assert not stray, [(i, bounced[i]) for i in stray[:20]]
    assert pf.queue_empty()
