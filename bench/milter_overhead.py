#!/usr/bin/env python3
"""Milter overhead on real Postfix 3.7 (issue 9): 2,000 messages (4.1 KB) over 20 concurrent SMTP sessions on
loopback, delivered to ``discard``, with no milter, with do-nothing pymilter milters, and with ours
(``requiretls postfix-config --apply`` + ``requiretls milter``), all on unix sockets.

The two do-nothing references: ``noop`` is a plain ``Milter.Base`` (every optional step switched off: Postfix
sends macros and end-of-message only, the floor of any pymilter milter); ``noop-steps`` negotiates exactly the
steps, no-reply flags and macro lists that ours does and returns at once from each (the floor for that step set;
the script checks that its protocol mask equals ours).  ``--compare DIR`` adds ours run from another checkout
(e.g. a ``git worktree`` of an older commit) with the same generated configuration, for before/after tables.

Prints a table (median of ``--runs`` runs, configurations alternating within each run): wall time with its
spread, messages/second, the milter process's CPU seconds during the measured batch, and the wall-time ratios
against no milter and against the do-nothing milter; and how many CPUs niced processes (other work, e.g. a fuzz
run) kept busy meanwhile.  Goal: ours within 15% of no milter and within 5% of
do-nothing.  Takes the test sessions' testbed lock while it measures.
Run as root from the repository: ``.venv/bin/python bench/milter_overhead.py [--messages 2000] [--runs 5]``.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import cpu_seconds, parallel  # noqa: E402

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

# Same steps as ours (no-reply connect/envfrom/envrcpt/header, eom answered, the rest off) and the same macro
# lists; each callback returns at once.  Run from the checkout whose milter it mirrors.
NOOP_STEPS_MILTER = """
import Milter, os, sys
from requiretls.milter.app import RequireTLSMilter as Ours
class NoopSteps(Milter.Base):
    @Milter.noreply
    def connect(self, hostname, family, hostaddr): return Milter.CONTINUE
    @Milter.noreply
    def envfrom(self, mailfrom, *params): return Milter.CONTINUE
    @Milter.noreply
    def envrcpt(self, to, *params): return Milter.CONTINUE
    @Milter.noreply
    def header(self, name, value): return Milter.CONTINUE
    def eom(self): return Milter.ACCEPT
for step in ("connect", "hello", "envfrom", "envrcpt", "data", "eoh", "eom"):
    syms = getattr(getattr(Ours, step), "_symlist", None)
    if syms is not None:
        setattr(NoopSteps, step, Milter.symlist(*syms)(getattr(NoopSteps, step)))
assert NoopSteps.protocol_mask() == Ours.protocol_mask(), (hex(NoopSteps.protocol_mask()), hex(Ours.protocol_mask()))
path = sys.argv[1]
os.makedirs(os.path.dirname(path), exist_ok=True)
os.umask(0)
Milter.factory = NoopSteps
Milter.set_flags(0)
Milter.runmilter("noop-steps", "unix:" + path, 30)
"""

NAMES = {
    "none": "no milter",
    "noop": "do-nothing pymilter (plain Milter.Base)",
    "noop-steps": "do-nothing pymilter, ours' steps and macros",
    "ours": "requiretls milter + generated config",
    "compare": "requiretls milter + generated config, {tree}",
}


def message(i: int, rcpt: str = "bob@dane.test") -> bytes:
    lines = [f"line {n:03d} of message {i}: " + "x" * 60 for n in range(46)]
    body = "\r\n".join(lines)
    return (f"From: alice@sender.test\r\nTo: {rcpt}\r\nSubject: benchmark {i}\r\n"
            f"Message-ID: <{i}.{time.time_ns()}@sender.test>\r\nDate: Mon, 23 Nov 2026 09:00:00 +0000\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n{body}\r\n").encode()


def blast(pf: Postfix, total: int, sessions: int, rcpt: str = "bob@dane.test") -> float:
    per = total // sessions
    msgs = [message(i, rcpt) for i in range(per)]

    def worker() -> None:
        with smtplib.SMTP("127.0.0.1", pf.ports.smtp, timeout=60, local_hostname="bench.local.test") as s:
            for m in msgs:
                s.sendmail("alice@sender.test", [rcpt], m)

    return parallel(sessions, worker, "sessions")


def niced_cpu_seconds() -> float:
    """CPU time spent by niced processes, all CPUs (``/proc/stat``): other work (such as a niced fuzz run)
    competing with the measurement, which itself runs at nice 0."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[2]) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine, all CPUs (``/proc/stat``): busy is user + nice + system +
    irq + softirq, the work every process did, Postfix's, the milter's and the load generator's alike; steal is
    time the hypervisor gave to other machines (the noise of a shared VM)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tck = os.sysconf("SC_CLK_TCK")
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / tck, f[7] / tck


def _wait_for(sock: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    end = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def configure(
    pf: Postfix, bed: Bed, mode: str, compare: Path | None
) -> tuple[Plugin | None, subprocess.Popen[bytes] | None]:
    if pf.running:
        pf.stop()
    pf.reset()
    pf.set(default_transport="discard", relay_transport="discard", smtpd_client_connection_count_limit="0",
           smtpd_client_message_rate_limit="0", smtpd_recipient_restrictions="permit_mynetworks, reject")
    if mode == "none":
        pf.start()
        return None, None
    if mode in ("noop", "noop-steps"):
        sock = pf.queue_dir / "bench" / f"{mode}.sock"
        code = NOOP_MILTER if mode == "noop" else NOOP_STEPS_MILTER
        proc = subprocess.Popen([sys.executable, "-c", code, str(sock)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_for(sock, proc, mode)
        pf.set(smtpd_milters=f"{{ unix:bench/{mode}.sock, default_action=tempfail }}",
               milter_default_action="tempfail")
        pf.start()
        return None, proc
    plugin = Plugin(bed, pf)
    plugin.apply()
    if mode == "ours":
        plugin.start_daemon("milter")
        pf.start()
        return plugin, None
    # ours from another checkout, with this checkout's generated configuration
    assert compare is not None
    if plugin.milter_sock.exists():
        plugin.milter_sock.unlink()
    proc = subprocess.Popen([sys.executable, "-m", "requiretls", "milter", "--config", str(plugin.config)],
                            cwd=compare, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _wait_for(plugin.milter_sock, proc, f"the milter of {compare}")
    pf.start()
    return plugin, proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--modes", default="none,noop,noop-steps,ours",
                    help="comma-separated, from: none, noop, noop-steps, ours (none and noop are always run)")
    ap.add_argument("--compare", metavar="DIR", type=Path,
                    help="also run ours from this checkout (e.g. a git worktree of an older commit)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (the testbed needs it)", file=sys.stderr)
        return 2
    with running_bed() as bed:
        return run(bed, args)


def run(bed: Bed, args: argparse.Namespace) -> int:
    pf = bed.postfix("3.7")
    modes = ["none", "noop", *(m for m in args.modes.split(",") if m not in ("none", "noop"))]
    if args.compare:
        modes.append("compare")
    walls: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}
    busy: dict[str, list[float]] = {m: [] for m in modes}
    steal: list[float] = []
    niced: list[float] = []
    try:
        for run in range(args.runs):
            # rotate the order each run, so that no configuration always follows the same one
            for mode in modes[run % len(modes):] + modes[:run % len(modes)]:
                plugin, proc = configure(pf, bed, mode, args.compare)
                pid = proc.pid if proc is not None else plugin.procs["milter"].pid if plugin is not None else None
                try:
                    blast(pf, args.sessions * 5, args.sessions)  # warm-up: process start, first connections
                    cpu0, nice0 = cpu_seconds(pid) if pid else 0.0, niced_cpu_seconds()
                    busy0, steal0 = machine_cpu_seconds()
                    walls[mode].append(blast(pf, args.messages, args.sessions))
                    busy1, steal1 = machine_cpu_seconds()
                    busy[mode].append(busy1 - busy0 - (niced_cpu_seconds() - nice0))
                    steal.append((steal1 - steal0) / walls[mode][-1])
                    cpus[mode].append(cpu_seconds(pid) - cpu0 if pid else 0.0)
                    niced.append((niced_cpu_seconds() - nice0) / walls[mode][-1])
                finally:
                    pf.stop()
                    if plugin is not None:
                        plugin.stop()
                    if proc is not None:
                        proc.terminate()
                        proc.wait(10)
                print(f"run {run + 1} {mode}: {walls[mode][-1]:.2f} s, milter CPU {cpus[mode][-1]:.2f} s",
                      file=sys.stderr)
    finally:
        if pf.running:
            pf.stop()
    med = {m: statistics.median(w) for m, w in walls.items()}
    print(f"\nMilter overhead, Postfix {pf.pv.full_version}: {args.messages} messages of "
          f"{len(message(0))} bytes over {args.sessions} SMTP sessions, discard delivery, "
          f"median of {args.runs} runs (configurations alternating); niced processes elsewhere used "
          f"{statistics.median(niced):.2f} CPU (median over the batches, max {max(niced):.2f}); the hypervisor "
          f"took {statistics.median(steal):.2f} CPU (steal, median; max {max(steal):.2f})\n")
    mbusy = {m: statistics.median(b) for m, b in busy.items()}
    print("| configuration | wall s (median) | wall s (min-max) | msgs/s | milter CPU s | machine CPU s | vs no milter "
          "(wall) | vs do-nothing milter (wall) | vs no milter (machine CPU) | vs do-nothing (machine CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in modes:
        name = NAMES[m].format(tree=args.compare)
        cpu = f"{statistics.median(cpus[m]):.2f}" if m != "none" else "-"
        print(f"| {name} | {med[m]:.2f} | {min(walls[m]):.2f}-{max(walls[m]):.2f} | {args.messages / med[m]:,.0f} "
              f"| {cpu} | {mbusy[m]:.2f} | {med[m] / med['none'] - 1:+.1%} | {med[m] / med['noop'] - 1:+.1%} "
              f"| {mbusy[m] / mbusy['none'] - 1:+.1%} | {mbusy[m] / mbusy['noop'] - 1:+.1%} |")
    if "ours" in med:
        ours_none, ours_noop = med["ours"] / med["none"] - 1, med["ours"] / med["noop"] - 1
        print(f"\ngoal ours within 15% of no milter: {'met' if ours_none <= 0.15 else 'not met'} "
              f"({ours_none:+.1%}); within 5% of do-nothing: {'met' if ours_noop <= 0.05 else 'not met'} "
              f"({ours_noop:+.1%})")
        cpu_none, cpu_noop = mbusy["ours"] / mbusy["none"] - 1, mbusy["ours"] / mbusy["noop"] - 1
        print(f"the same on machine CPU (steadier than wall time on a shared VM): {cpu_none:+.1%} of no milter, "
              f"{cpu_noop:+.1%} of do-nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
