#!/usr/bin/env python3
"""Milter overhead on real Postfix 3.7 (issue 9): 2,000 messages (4.1 KB) over 20 concurrent SMTP sessions on
loopback, delivered to ``discard``, with no milter, with a do-nothing pymilter milter (the floor of the stack),
and with ours (``requiretls postfix-config --apply`` + ``requiretls milter``), all on unix sockets.

Prints a table (median of ``--runs`` alternating runs): messages/second, wall time, and the ratios against no
milter and against the do-nothing milter.  Goal: ours within 15% of no milter and within 5% of do-nothing.
Run as root from the repository: ``.venv/bin/python bench/milter_overhead.py [--messages 2000] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.plugin import Plugin, running_bed  # noqa: E402
from tests.testbed.bed import Bed  # noqa: E402
from tests.testbed.postfix import Postfix  # noqa: E402

NOOP_MILTER = """
import Milter, os, sys
class Noop(Milter.Base):
    pass
path = sys.argv[1]
os.makedirs(os.path.dirname(path), exist_ok=True)
os.umask(0)
Milter.factory = Noop
Milter.set_flags(0)
Milter.runmilter("noop", "unix:" + path, 30)
"""


def message(i: int, rcpt: str = "bob@dane.test") -> bytes:
    lines = [f"line {n:03d} of message {i}: " + "x" * 60 for n in range(46)]
    body = "\r\n".join(lines)
    return (f"From: alice@sender.test\r\nTo: {rcpt}\r\nSubject: benchmark {i}\r\n"
            f"Message-ID: <{i}.{time.time_ns()}@sender.test>\r\nDate: Mon, 23 Nov 2026 09:00:00 +0000\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n{body}\r\n").encode()


def blast(pf: Postfix, total: int, sessions: int, rcpt: str = "bob@dane.test") -> float:
    per = total // sessions
    errors: list[str] = []
    msgs = [message(i, rcpt) for i in range(per)]

    def worker() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", pf.ports.smtp, timeout=60, local_hostname="bench.local.test") as s:
                for m in msgs:
                    s.sendmail("alice@sender.test", [rcpt], m)
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(sessions)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} sessions failed: {errors[:3]}")
    return wall


def configure(pf: Postfix, bed: Bed, mode: str) -> tuple[Plugin | None, subprocess.Popen[bytes] | None]:
    if pf.running:
        pf.stop()
    pf.reset()
    pf.set(default_transport="discard", relay_transport="discard", smtpd_client_connection_count_limit="0",
           smtpd_client_message_rate_limit="0", smtpd_recipient_restrictions="permit_mynetworks, reject")
    if mode == "none":
        pf.start()
        return None, None
    if mode == "noop":
        sock = pf.queue_dir / "bench" / "noop.sock"
        proc = subprocess.Popen([sys.executable, "-c", NOOP_MILTER, str(sock)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        end = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < end:
            time.sleep(0.05)
        pf.set(smtpd_milters="{ unix:bench/noop.sock, default_action=tempfail }", milter_default_action="tempfail")
        pf.start()
        return None, proc
    plugin = Plugin(bed, pf)
    plugin.apply()
    plugin.start_daemon("milter")
    pf.start()
    return plugin, None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (the testbed needs it)", file=sys.stderr)
        return 2
    with running_bed() as bed:
        return run(bed, args)


def run(bed: Bed, args: argparse.Namespace) -> int:
    pf = bed.postfix("3.7")
    modes = ("none", "noop", "ours")
    walls: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for run in range(args.runs):
            for mode in modes:
                plugin, proc = configure(pf, bed, mode)
                try:
                    blast(pf, args.sessions * 5, args.sessions)  # warm-up: process start, first connections
                    walls[mode].append(blast(pf, args.messages, args.sessions))
                finally:
                    pf.stop()
                    if plugin is not None:
                        plugin.stop()
                    if proc is not None:
                        proc.terminate()
                        proc.wait(10)
                print(f"run {run + 1} {mode}: {walls[mode][-1]:.2f} s", file=sys.stderr)
    finally:
        if pf.running:
            pf.stop()
    med = {m: statistics.median(w) for m, w in walls.items()}
    print(f"\nMilter overhead, Postfix {pf.pv.full_version}: {args.messages} messages of "
          f"{len(message(0))} bytes over {args.sessions} SMTP sessions, discard delivery, "
          f"median of {args.runs} alternating runs\n")
    print("| configuration | wall s | msgs/s | vs no milter (wall) | vs do-nothing milter (wall) |")
    print("|---|---:|---:|---:|---:|")
    names = {"none": "no milter", "noop": "do-nothing pymilter (unix socket)",
             "ours": "requiretls milter + generated config (unix socket)"}
    for m in modes:
        print(f"| {names[m]} | {med[m]:.2f} | {args.messages / med[m]:,.0f} | "
              f"{med[m] / med['none'] - 1:+.1%} | {med[m] / med['noop'] - 1:+.1%} |")
    ours_none, ours_noop = med["ours"] / med["none"] - 1, med["ours"] / med["noop"] - 1
    print(f"\ngoal ours within 15% of no milter: {'met' if ours_none <= 0.15 else 'not met'} ({ours_none:+.1%}); "
          f"within 5% of do-nothing: {'met' if ours_noop <= 0.05 else 'not met'} ({ours_noop:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
