#!/usr/bin/env python3
"""SMTP front vs Postfix's smtpd alone (issue 20): the same client load over TLS, once straight to smtpd (which
does STARTTLS itself) and once through ``requiretls front`` (which does STARTTLS and passes the dialogue to an
smtpd on a unix socket, or with ``--tcp-backend`` on loopback TCP, with the PROXY protocol).  Postfix 3.7 of the
testbed, mail discarded after the queue so that only reception is measured.

* messages/s: ``--sessions`` sessions at once, each STARTTLS once and then ``--messages / sessions`` messages
  (smtplib, one command at a time; and a client that pipelines MAIL, RCPT and DATA as MTAs do);
* TLS handshakes/s: ``--sessions`` clients, each connecting ``--handshakes / sessions`` times (EHLO, STARTTLS,
  EHLO, QUIT);
* RSS per idle connection: the growth of the front's VmRSS (parent and workers) with ``--idle`` connections
  open after the greeting;
* the CPU time of the front's workers per message (the one-command-at-a-time load), under this load;
* the whole machine's CPU time per message of that load, for each side, and the share of CPU left idle
  meanwhile: their ratio is what the rates' ratio would be where CPU is the only limit.

``--compare DIR`` (another checkout's top directory) adds its front as a third side, on the same smtpd behind
it, measured in the same runs: two versions of the front compared under the same drift of the machine.

Each measure starts with Postfix's queue empty (the mail of the measure before delivered), the front and smtpd
alone in turn first.  Goal: both rates at least 0.8x smtpd's, judged by the median of the run-by-run ratios
(each run's pair is measured seconds apart; the machine's load drifts over minutes).  Run as root from the
repository:
``.venv/bin/python bench/front_vs_postfix.py [--messages 1000] [--handshakes 400] [--runs 3] [--tcp-backend]
[--compare DIR]``.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import cpu_seconds, parallel  # noqa: E402

from tests.e2e.plugin import running_bed  # noqa: E402
from tests.testbed.bed import Bed  # noqa: E402
from tests.testbed.postfix import Postfix  # noqa: E402

MSG = (b"From: a@sender.test\r\nTo: b@dane.test\r\nSubject: bench\r\n\r\n" + b"x" * 2000 + b"\r\n")


def _rss_kb(pid: int) -> int:
    """VmRSS of the front: the parent and its worker processes (which hold the connections)."""
    total = 0
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for p in [pid, *map(int, kids)]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def _ctx(bed: Bed) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(bed.pki.ca_cert))
    ctx.check_hostname = False
    return ctx


def messages(port: int, ctx: ssl.SSLContext, total: int, sessions: int) -> float:
    per = total // sessions

    def work() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60, local_hostname="bench.local.test") as s:
            s.starttls(context=ctx)
            for _ in range(per):
                s.sendmail("a@sender.test", ["b@dane.test"], MSG)

    return (per * sessions) / parallel(sessions, work)


def _replies(f: BinaryIO, n: int) -> list[bytes]:
    """``n`` whole replies (each its last line) from a reader; RuntimeError for one that is not 2xx/3xx."""
    out: list[bytes] = []
    while len(out) < n:
        line = f.readline()
        if not line:
            raise RuntimeError("connection closed")
        if line[3:4] != b"-":
            if line[:1] not in (b"2", b"3"):
                raise RuntimeError(line.decode("ascii", "replace").strip())
            out.append(line)
    return out


def pipelined(port: int, ctx: ssl.SSLContext, total: int, sessions: int) -> float:
    """As :func:`messages`, with a client that pipelines as MTAs do (RFC 2920): MAIL, RCPT and DATA in one
    write, then the message."""
    per = total // sessions

    def work() -> None:
        with socket.create_connection(("127.0.0.1", port), 60) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            f = raw.makefile("rb")
            _replies(f, 1)
            raw.sendall(b"EHLO bench.local.test\r\n")
            _replies(f, 1)
            raw.sendall(b"STARTTLS\r\n")
            _replies(f, 1)
            with ctx.wrap_socket(raw, server_hostname="mx") as t:
                tf = t.makefile("rb")
                t.sendall(b"EHLO bench.local.test\r\n")
                _replies(tf, 1)
                for _ in range(per):
                    t.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@dane.test>\r\nDATA\r\n")
                    _replies(tf, 3)
                    t.sendall(MSG + b".\r\n")
                    _replies(tf, 1)
                t.sendall(b"QUIT\r\n")
                _replies(tf, 1)

    return (per * sessions) / parallel(sessions, work)


def handshakes(port: int, ctx: ssl.SSLContext, total: int, sessions: int) -> float:
    per = total // sessions

    def work() -> None:
        for _ in range(per):
            with smtplib.SMTP("127.0.0.1", port, timeout=60, local_hostname="bench.local.test") as s:
                s.starttls(context=ctx)
                s.ehlo()

    return (per * sessions) / parallel(sessions, work)


def idle_rss(port: int, pid: int, n: int) -> float:
    time.sleep(0.5)
    before = _rss_kb(pid)
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", port), 10))
        time.sleep(2)
        after = _rss_kb(pid)
    finally:
        for s in socks:
            s.close()
    return (after - before) / n


#: The smtpd behind the front, as ``postfix-config --front`` writes it (less the milter's daemon name).
BACKEND_SMTPD = ("n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy -o smtpd_tls_security_level=none "
                 "-o smtpd_discard_ehlo_keywords=chunking,silent-discard")


def worker_cpu(pid: int) -> float:
    """CPU seconds (user and system) of the front's worker processes so far."""
    total = 0
    for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        fields = Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine so far, all CPUs (/proc/stat: busy is user, nice, system,
    irq and softirq; idle is idle and iowait)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    hz = os.sysconf("SC_CLK_TCK")
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / hz, (f[3] + f[4]) / hz


def start_front(pf: Postfix, port: int, where: str, code: Path = ROOT, name: str = "front-bench"
                ) -> subprocess.Popen[bytes]:
    """``requiretls front`` of the checkout ``code`` on ``port``, its smtpd at ``where``; once it accepts."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (a port in TIME_WAIT is free)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            # Else the probe below would meet the old one and the figures would be another front's.
            raise RuntimeError(f"127.0.0.1:{port} is taken (a front left by an earlier run? pkill -f "
                               f"'requiretls front --config {pf.dir}')") from None
    conf = pf.dir / f"{name}.toml"
    conf.write_text(f'[front]\nlisten = ["127.0.0.1:{port}"]\nbackend = "{where}"\n'
                    f'postfix_config_dir = "{pf.config_dir}"\nmax_connections = 5000\n')
    proc = subprocess.Popen([sys.executable, "-m", "requiretls", "front", "--config", str(conf)], cwd=code,
                            env={**os.environ, "PYTHONPATH": str(code)}, stdout=subprocess.DEVNULL,
                            stderr=open(pf.dir / f"{name}.log", "ab"))  # noqa: SIM115
    end = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return proc
        except OSError:
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError(f"front of {code} did not start") from None
            time.sleep(0.1)


def setup(bed: Bed, tcp: bool = False) -> tuple[Postfix, int, int, subprocess.Popen[bytes], str]:
    """Postfix 3.7 with the front: its smtpd behind the front on a public unix socket (the default wiring of
    ``postfix-config --front``), or with ``tcp`` on a loopback port; the public smtpd stays for the
    comparison."""
    pf = bed.postfix("3.7")
    if pf.running:
        pf.stop()
    pf.reset()
    backend, front_port = pf.ports.extra[5], pf.ports.extra[6]
    pf.set(default_transport="discard", relay_transport="discard", local_transport="discard",
           default_process_limit="200")
    if tcp:
        pf.add_service(f"127.0.0.1:{backend}", "inet", "inet " + BACKEND_SMTPD)
        where = f"127.0.0.1:{backend}"
    else:
        pf.add_service("requiretls-front", "unix", "unix " + BACKEND_SMTPD)
        where = "unix:public/requiretls-front"
    pf.start()
    return pf, pf.ports.smtp, front_port, start_front(pf, front_port, where), where


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--handshakes", type=int, default=400)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--idle", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tcp-backend", action="store_true",
                    help="the smtpd behind the front on loopback TCP instead of the default unix socket")
    ap.add_argument("--compare", metavar="DIR", type=Path,
                    help="another checkout's top directory: its front as a third side, in the same runs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (the testbed needs it)", file=sys.stderr)
        return 2
    with running_bed() as bed:
        pf, direct, front, proc, where = setup(bed, args.tcp_backend)
        ports = {"direct": direct, "front": front}
        fronts = {"front": proc}
        if args.compare is not None:
            ports["other"] = pf.ports.extra[7]
            fronts["other"] = start_front(pf, ports["other"], where, args.compare.resolve(), "front-bench-other")
        ctx = _ctx(bed)
        try:
            sides = list(ports)
            res: dict[str, list[float]] = {f"{m} {w}": [] for m in ("msg", "pipe", "hs") for w in sides}
            cpu: dict[str, list[float]] = {w: [] for w in fronts}
            # the whole machine (client, front, Postfix) per message of the one-command-at-a-time load, and the
            # share of CPU left idle meanwhile
            busy: dict[str, list[float]] = {w: [] for w in sides}
            client: dict[str, list[float]] = {w: [] for w in sides}  # of which this process (the clients)
            idle: dict[str, list[float]] = {w: [] for w in sides}
            loads = {"msg": (messages, args.messages), "pipe": (pipelined, args.messages),
                     "hs": (handshakes, args.handshakes)}
            for run in range(args.runs):
                for m, (fn, n) in loads.items():
                    # Each measure starts as the other did: Postfix done with the mail of the one before (the
                    # queue empty), and the sides first in turn (a drift in the machine's load favours none).
                    for w in sides[run % len(sides):] + sides[:run % len(sides)]:
                        pf.wait_queue_empty(120)
                        before = worker_cpu(fronts[w].pid) if w in fronts else 0.0
                        b0, i0 = machine_cpu()
                        c0 = cpu_seconds(os.getpid())
                        res[f"{m} {w}"].append(fn(ports[w], ctx, n, args.sessions))
                        b1, i1 = machine_cpu()
                        if m == "msg":
                            busy[w].append((b1 - b0) / n)
                            client[w].append((cpu_seconds(os.getpid()) - c0) / n)
                            idle[w].append((i1 - i0) / max(b1 - b0 + i1 - i0, 1e-9))
                        if w in fronts and m == "msg":
                            cpu[w].append((worker_cpu(fronts[w].pid) - before) / n)
                print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in res.items()), file=sys.stderr)
            rss = idle_rss(front, proc.pid, args.idle)
        finally:
            for p in fronts.values():
                p.terminate()
                p.wait(10)
            pf.stop()
    med = {k: statistics.median(v) for k, v in res.items()}

    # The ratio of each run's pair (measured a few seconds apart): its median is the figure the goal is judged
    # by; the lowest and highest show how much the machine moved.
    def pairs(m: str, w: str = "front") -> list[float]:
        return sorted(f / d for d, f in zip(res[f"{m} direct"], res[f"{m} {w}"], strict=True))

    def by_run(m: str, w: str = "front") -> str:
        r = pairs(m, w)
        return f"{statistics.median(r):.2f}x ({r[0]:.2f} - {r[-1]:.2f})"

    print(f"\nSMTP front vs smtpd alone, Postfix {pf.version} testbed, {args.sessions} sessions at once, TLS, "
          f"median of {args.runs} runs; the front's smtpd on {'loopback TCP' if args.tcp_backend else 'a unix socket'}"
          "\n")
    print("| measure | smtpd alone (median) | through the front (median) | ratio of the medians | "
          "ratio run by run: median (lowest - highest) |")
    print("|---|---:|---:|---:|---:|")
    names = {"msg": f"messages/s ({args.messages} messages)",
             "pipe": "messages/s, pipelining client (MAIL, RCPT, DATA in one write)",
             "hs": f"TLS handshakes/s ({args.handshakes})"}
    for m, name in names.items():
        print(f"| {name} | {med[f'{m} direct']:,.0f} | {med[f'{m} front']:,.0f} | "
              f"{med[f'{m} front'] / med[f'{m} direct']:.2f}x | {by_run(m)} |")
    print(f"\nfront RSS per idle connection ({args.idle} open): {rss:.1f} KiB")
    print("front workers' CPU per message (one command at a time): "
          f"median {statistics.median(cpu['front']) * 1e6:.0f} us")
    # What the rate ratio would be on a machine kept busy (CPU the only limit): the machine's CPU per message
    # alone and through the front.  Less moved by the machine's idle spells than the rates are.
    b_d, b_f = statistics.median(busy["direct"]) * 1e6, statistics.median(busy["front"]) * 1e6
    print(f"machine CPU per message (client, front and Postfix; one command at a time): smtpd alone {b_d:.0f} us, "
          f"through the front {b_f:.0f} us: {b_d / b_f:.2f}x; CPU left idle meanwhile: "
          f"{statistics.median(idle['direct']) * 100:.0f} % / {statistics.median(idle['front']) * 100:.0f} %")
    # An MX's clients are elsewhere: without this process's own CPU (the 20 clients), the same ratio on the
    # server's side alone.
    c_d, c_f = statistics.median(client["direct"]) * 1e6, statistics.median(client["front"]) * 1e6
    print(f"  of which the clients (this process): {c_d:.0f} us / {c_f:.0f} us; the server's side alone: "
          f"{b_d - c_d:.0f} us / {b_f - c_f:.0f} us: {(b_d - c_d) / (b_f - c_f):.2f}x")
    if args.compare is not None:
        print(f"\nthis front vs the front of {args.compare}, same runs: ratio to smtpd alone, run by run\n")
        print("| measure | this front | the other | CPU per message: this / the other |")
        print("|---|---:|---:|---:|")
        c_this, c_other = statistics.median(cpu["front"]) * 1e6, statistics.median(cpu["other"]) * 1e6
        for m, name in names.items():
            extra = f"{c_this:.0f} / {c_other:.0f} us" if m == "msg" else ""
            print(f"| {name} | {by_run(m)} | {by_run(m, 'other')} | {extra} |")
    ok = statistics.median(pairs("msg")) >= 0.8 and statistics.median(pairs("hs")) >= 0.8
    print(f"goal at least 0.8x on both (messages, handshakes; run by run): {'met' if ok else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
