#!/usr/bin/env python3
"""Relay agent vs Postfix's own smtp client (issue 9): the same N messages to the same test MX (mx.dane.test,
DANE + REQUIRETLS), once delivered by Postfix 3.7's smtp client at ``dane-only``, once the same with the plugin
installed (the milter sees every message; none is tagged, so Postfix's client still delivers them), and once
tagged REQUIRETLS by a local rule and delivered by the agent (LMTP in, DANE-verified STARTTLS and
``MAIL FROM ... REQUIRETLS`` out).  The middle row separates what the milter costs every message from what the
agent costs the tagged ones.  CPU seconds of the agent, the milter and the whole machine are printed too.

Time is measured from the first submission until the MX has recorded all N (submission is the same in all).
Goal (issue 16): the agent reaches at least 0.9x Postfix's messages/second; the agent's RSS at the end of its
runs is reported (VmRSS of the relay process just before it stops).
Run as root from the repository: ``.venv/bin/python bench/relay_vs_postfix.py [--messages 500] [--runs 3]``.

``--destinations 20``: the messages go round-robin to 20 recipient domains (``b01.bench.test`` ...), each
routed by ``transport_maps`` to a next hop of its own among five MX hosts of the testbed (``[mx.K.test]``,
``[mx.K.test]:25``, ``mx.K.test``, ``mx.K.test:25``, so that Postfix counts 20 destinations: it keys them by
the next hop as written; the agent keys by the normalized next hop, two per MX host).  Hosts with TLSA records
are verified with DANE, the others with PKIX against the testbed CA, by both: Postfix through
``smtp_tls_policy_maps`` (``dane-only`` / ``secure``), the agent by its own rules for a next hop.
"""

from __future__ import annotations

import argparse
import os
import signal
import smtplib
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import cpu_seconds  # noqa: E402
from milter_overhead import blast, message  # noqa: E402

from tests.e2e.plugin import Plugin, running_bed  # noqa: E402
from tests.testbed.bed import Bed  # noqa: E402
from tests.testbed.hosts import MX_HOSTS  # noqa: E402
from tests.testbed.postfix import Postfix  # noqa: E402

RSS_KB: list[int] = []
PROFILE: str | None = None
#: CPU seconds (user + system) per run and mode: the agent, the milter, and the whole machine.
CPU: dict[str, list[dict[str, float]]] = {"postfix": [], "milter": [], "agent": []}
TICK = os.sysconf("SC_CLK_TCK")


def _machine_cpu() -> float:
    """Busy CPU seconds of the machine (all CPUs, everything but idle and iowait)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / TICK


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


#: (MX key, DANE) for the parallel-destinations mode: MX hosts with a good certificate in signed zones that offer
#: REQUIRETLS.
PARALLEL_HOSTS = (("dane", True), ("toggle", True), ("twomx-2", True), ("signed", False), ("sender", False))
#: Four ways to write the same next hop: Postfix keeps a destination (queue, concurrency) for each.  Unbracketed is
#: an MX lookup of the host name, which has no MX record: its own address (implicit MX).
_SPELLINGS = ("[{h}]", "[{h}]:25", "{h}", "{h}:25")


def destinations(n: int) -> list[tuple[str, str, str, bool]]:
    """``n`` (recipient domain, next hop, MX key, DANE) for transport_maps."""
    out = []
    for i in range(n):
        key, dane = PARALLEL_HOSTS[i % len(PARALLEL_HOSTS)]
        host = next(m.fqdn.rstrip(".") for m in MX_HOSTS if m.key == key)
        hop = _SPELLINGS[(i // len(PARALLEL_HOSTS)) % len(_SPELLINGS)].format(h=host)
        out.append((f"b{i + 1:02d}.bench.test", hop, key, dane))
    return out


def blast_many(pf: Postfix, total: int, sessions: int, rcpts: list[str]) -> None:
    """``total`` messages over ``sessions`` SMTP sessions, recipients round-robin over ``rcpts``."""
    per = total // sessions
    errors: list[str] = []

    def worker(w: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", pf.ports.smtp, timeout=60, local_hostname="bench.local.test") as s:
                for i in range(per):
                    rcpt = rcpts[(w * per + i) % len(rcpts)]
                    s.sendmail("alice@sender.test", [rcpt], message(w * per + i, rcpt))
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} sessions failed: {errors[:3]}")


def one(bed: Bed, mode: str, n: int, sessions: int, ndest: int = 0) -> float:
    pf = bed.postfix("3.7")
    if pf.running:
        pf.stop()
    pf.reset()
    bed.clear_mx()
    dests = destinations(ndest) if ndest else []
    table = "".join(f"{d} requiretls=yes\n" for d, _, _, _ in dests) or "dane.test requiretls=yes\n"
    plugin = Plugin(bed, pf, table=table if mode == "agent" else "")
    try:
        if dests:
            transport = pf.config_dir / "bench_transport"
            transport.write_text("".join(f"{d} smtp:{hop}\n" for d, hop, _, _ in dests))
            extra = {"transport_maps": f"texthash:{transport}"}
            if mode != "agent":  # Postfix's own smtp client: the same verification by smtp_tls_policy_maps
                policy = pf.config_dir / "bench_tls_policy"
                policy.write_text("".join(f"{hop} {'dane-only' if dane else 'secure'}\n" for _, hop, _, dane in dests))
                extra.update(smtp_tls_policy_maps=f"texthash:{policy}", smtp_tls_CAfile=str(bed.pki.ca_cert))
        if mode in ("agent", "milter"):
            # "milter": the plugin installed as for "agent" (the milter sees every message), but no rule tags
            # the messages, so Postfix's own smtp client delivers them (dane-only / secure, as in "postfix").
            plugin.apply()
            if mode == "milter":
                pf.set(smtp_tls_security_level="dane-only")
            if dests:
                pf.set(**extra)
            plugin.start_daemons(("milter", "relay"))
            pf.start()
        else:
            pf.set(smtp_tls_security_level="dane-only", **(extra if dests else {}))
            pf.start()
        keys = sorted({k for _, _, k, _ in dests}) if dests else ["dane"]
        pids = {d: p.pid for d, p in plugin.procs.items()}
        cpu0 = {d: cpu_seconds(pid) for d, pid in pids.items()} | {"machine": _machine_cpu()}
        spy = None
        if PROFILE and mode == "agent":
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                                    str(pids["relay"]), "--format", "raw", "--nonblocking", "--threads",
                                    "--output", PROFILE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        if dests:
            blast_many(pf, n, sessions, [f"bob@{d}" for d, _, _, _ in dests])
        else:
            blast(pf, n, sessions, rcpt="bob@dane.test")
        end = t0 + max(120, n / 5)
        while sum(len(bed.mx(k).deliveries()) for k in keys) < n and time.monotonic() < end:
            time.sleep(0.05)
        took = time.monotonic() - t0
        CPU[mode].append({d: cpu_seconds(pid) - cpu0[d] for d, pid in pids.items()}
                         | {"machine": _machine_cpu() - cpu0["machine"]})
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        got = [d for k in keys for d in bed.mx(k).deliveries()]
        if len(got) != n or not all(d.tls for d in got) or (mode == "agent") != all(d.requiretls for d in got):
            raise RuntimeError(f"{mode}: {len(got)} deliveries, not all as expected\n{pf.log()[-3000:]}")
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
    ap.add_argument("--destinations", type=int, default=0, help="spread over N destinations (e.g. 20)")
    ap.add_argument("--profile", metavar="FILE", help="py-spy profile of the agent (folded stacks) into FILE")
    args = ap.parse_args()
    global PROFILE
    PROFILE = args.profile
    if os.geteuid() != 0:
        print("run as root (the testbed needs it)", file=sys.stderr)
        return 2
    with running_bed() as bed:
        times: dict[str, list[float]] = {"postfix": [], "milter": [], "agent": []}
        for run in range(args.runs):
            for mode in times:
                times[mode].append(one(bed, mode, args.messages, args.sessions, args.destinations))
                print(f"run {run + 1} {mode}: {times[mode][-1]:.2f} s", file=sys.stderr)
    med = {m: statistics.median(t) for m, t in times.items()}
    rate = {m: args.messages / med[m] for m in med}
    where = (f"{args.destinations} destinations on {len(PARALLEL_HOSTS)} MX hosts" if args.destinations
             else "mx.dane.test")
    print(f"\nREQUIRETLS delivery, Postfix 3.7.11 testbed: {args.messages} messages to {where} over "
          f"{args.sessions} submission sessions, median of {args.runs} runs (each: "
          f"{', '.join(f'{x:.2f}' for x in times['postfix'])} s Postfix, "
          f"{', '.join(f'{x:.2f}' for x in times['milter'])} s Postfix with the milter, "
          f"{', '.join(f'{x:.2f}' for x in times['agent'])} s agent)\n")
    pf_kind = "dane-only / secure" if args.destinations else "dane-only"
    ag_kind = "DANE / PKIX" if args.destinations else "DANE"
    print("| delivered by | seconds | msgs/s | vs Postfix |")
    print("|---|---:|---:|---:|")
    print(f"| Postfix smtp client, {pf_kind} (no REQUIRETLS) | {med['postfix']:.2f} | {rate['postfix']:,.0f} | 1.00x |")
    print(f"| Postfix smtp client, {pf_kind}, plugin installed (the milter sees every message, none tagged) | "
          f"{med['milter']:.2f} | {rate['milter']:,.0f} | {rate['milter'] / rate['postfix']:.2f}x |")
    print(f"| requiretls agent ({ag_kind}, MAIL FROM REQUIRETLS) | {med['agent']:.2f} | {rate['agent']:,.0f} | "
          f"{rate['agent'] / rate['postfix']:.2f}x (vs the row above: {rate['agent'] / rate['milter']:.2f}x) |")
    print("\nCPU seconds over the run (median; user + system): "
          + "; ".join(f"{m}: " + ", ".join(f"{k} {statistics.median(c[k] for c in CPU[m]):.2f}" for k in CPU[m][0])
                      for m in CPU if CPU[m]))
    ok = rate["agent"] >= rate["postfix"] * 0.9
    print(f"\ngoal at least 0.9x Postfix's msgs/s: {'met' if ok else 'not met'} "
          f"({rate['agent'] / rate['postfix']:.2f}x; {rate['agent'] / rate['milter']:.2f}x of Postfix's client "
          f"with the milter in the path of both); agent RSS at the end of each run: "
          f"{', '.join(f'{k / 1024:.0f} MB' for k in RSS_KB)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
