#!/usr/bin/env python3
"""Relay agent vs Postfix's own smtp client (issue 9): the same N messages to the same test MX (mx.dane.test,
DANE + REQUIRETLS), once delivered by Postfix 3.7's smtp client at ``dane-only`` and once tagged REQUIRETLS by a
local rule and delivered by the agent (LMTP in, DANE-verified STARTTLS and ``MAIL FROM ... REQUIRETLS`` out).

Time is measured from the first submission until the MX has recorded all N (submission is the same in both).
Goal (issue 16): the agent reaches at least 0.9x Postfix's messages/second; the agent's RSS at the end of its
runs is reported (VmRSS of the relay process just before it stops).
Run as root from the repository: ``.venv/bin/python bench/relay_vs_postfix.py [--messages 500] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from milter_overhead import blast  # noqa: E402

from tests.e2e.plugin import Plugin, running_bed  # noqa: E402
from tests.testbed.bed import Bed  # noqa: E402

RSS_KB: list[int] = []


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def one(bed: Bed, mode: str, n: int, sessions: int) -> float:
    pf = bed.postfix("3.7")
    if pf.running:
        pf.stop()
    pf.reset()
    bed.clear_mx()
    plugin = Plugin(bed, pf, table="dane.test requiretls=yes\n" if mode == "agent" else "")
    try:
        if mode == "agent":
            plugin.start(daemons=("milter", "relay"))
        else:
            pf.set(smtp_tls_security_level="dane-only")
            pf.start()
        rec = bed.mx("dane")
        t0 = time.monotonic()
        blast(pf, n, sessions, rcpt="bob@dane.test")
        rec.wait_for(n, timeout=600)
        took = time.monotonic() - t0
        got = rec.deliveries()
        if len(got) != n or not all(d.tls for d in got) or (mode == "agent") != all(d.requiretls for d in got):
            raise RuntimeError(f"{mode}: {len(got)} deliveries, not all as expected")
        if mode == "agent":
            time.sleep(3)  # idle sessions closed
            RSS_KB.append(_rss_kb(plugin.procs["relay"].pid))
        return took
    finally:
        plugin.stop()
        if pf.running:
            pf.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (the testbed needs it)", file=sys.stderr)
        return 2
    with running_bed() as bed:
        times: dict[str, list[float]] = {"postfix": [], "agent": []}
        for run in range(args.runs):
            for mode in times:
                times[mode].append(one(bed, mode, args.messages, args.sessions))
                print(f"run {run + 1} {mode}: {times[mode][-1]:.2f} s", file=sys.stderr)
    med = {m: statistics.median(t) for m, t in times.items()}
    rate = {m: args.messages / med[m] for m in med}
    print(f"\nREQUIRETLS delivery, Postfix 3.7.11 testbed: {args.messages} messages to mx.dane.test over "
          f"{args.sessions} submission sessions, median of {args.runs} runs\n")
    print("| delivered by | seconds | msgs/s | vs Postfix |")
    print("|---|---:|---:|---:|")
    print(f"| Postfix smtp client, dane-only (no REQUIRETLS) | {med['postfix']:.2f} | {rate['postfix']:,.0f} | 1.00x |")
    print(f"| requiretls agent (DANE, MAIL FROM REQUIRETLS) | {med['agent']:.2f} | {rate['agent']:,.0f} | "
          f"{rate['agent'] / rate['postfix']:.2f}x |")
    ok = rate["agent"] >= rate["postfix"] * 0.9
    print(f"\ngoal at least 0.9x Postfix's msgs/s: {'met' if ok else 'not met'} "
          f"({rate['agent'] / rate['postfix']:.2f}x); agent RSS at the end of each run: "
          f"{', '.join(f'{k / 1024:.0f} MB' for k in RSS_KB)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
