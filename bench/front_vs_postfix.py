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
  open after the greeting.

Each measure starts with Postfix's queue empty (the mail of the measure before delivered), the front and smtpd
alone in turn first.  Goal: both rates at least 0.8x smtpd's, judged by the median of the run-by-run ratios
(each run's pair is measured seconds apart; the machine's load drifts over minutes).  Run as root from the
repository:
``.venv/bin/python bench/front_vs_postfix.py [--messages 1000] [--handshakes 400] [--runs 3] [--tcp-backend]``.
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

from benchlib import parallel  # noqa: E402

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
    out = []
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


def setup(bed: Bed, tcp: bool = False) -> tuple[Postfix, int, int, subprocess.Popen[bytes]]:
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
    conf = pf.dir / "front-bench.toml"
    conf.write_text(f'[front]\nlisten = ["127.0.0.1:{front_port}"]\nbackend = "{where}"\n'
                    f'postfix_config_dir = "{pf.config_dir}"\nmax_connections = 5000\n')
    proc = subprocess.Popen([sys.executable, "-m", "requiretls", "front", "--config", str(conf)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(pf.dir / "front-bench.log", "ab"))  # noqa: SIM115
    end = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", front_port), 1).close()
            break
        except OSError:
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError("front did not start") from None
            time.sleep(0.1)
    return pf, pf.ports.smtp, front_port, proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--handshakes", type=int, default=400)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--idle", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tcp-backend", action="store_true",
                    help="the smtpd behind the front on loopback TCP instead of the default unix socket")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (the testbed needs it)", file=sys.stderr)
        return 2
    with running_bed() as bed:
        pf, direct, front, proc = setup(bed, args.tcp_backend)
        ctx = _ctx(bed)
        try:
            res: dict[str, list[float]] = {f"{m} {w}": [] for m in ("msg", "pipe", "hs") for w in ("direct", "front")}
            loads = {"msg": (messages, args.messages), "pipe": (pipelined, args.messages),
                     "hs": (handshakes, args.handshakes)}
            for run in range(args.runs):
                for m, (fn, n) in loads.items():
                    # Each measure starts as the other did: Postfix done with the mail of the one before (the
                    # queue empty), and the two in turn first (a drift in the machine's load favours neither).
                    for w in (("direct", "front") if run % 2 == 0 else ("front", "direct")):
                        pf.wait_queue_empty(120)
                        res[f"{m} {w}"].append(fn(direct if w == "direct" else front, ctx, n, args.sessions))
                print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in res.items()), file=sys.stderr)
            rss = idle_rss(front, proc.pid, args.idle)
        finally:
            proc.terminate()
            proc.wait(10)
            pf.stop()
    med = {k: statistics.median(v) for k, v in res.items()}
    # The ratio of each run's pair (measured a few seconds apart): its median is the figure the goal is judged
    # by; the lowest and highest show how much the machine moved.
    pairs = {m: sorted(f / d for d, f in zip(res[f"{m} direct"], res[f"{m} front"], strict=True))
             for m in ("msg", "pipe", "hs")}
    print(f"\nSMTP front vs smtpd alone, Postfix {pf.version} testbed, {args.sessions} sessions at once, TLS, "
          f"median of {args.runs} runs; the front's smtpd on {'loopback TCP' if args.tcp_backend else 'a unix socket'}"
          "\n")
    print("| measure | smtpd alone (median) | through the front (median) | ratio of the medians | "
          "ratio run by run: median (lowest - highest) |")
    print("|---|---:|---:|---:|---:|")
    r_msg = med["msg front"] / med["msg direct"]
    r_hs = med["hs front"] / med["hs direct"]
    r_pipe = med["pipe front"] / med["pipe direct"]

    def by_run(m: str) -> str:
        return f"{statistics.median(pairs[m]):.2f}x ({pairs[m][0]:.2f} - {pairs[m][-1]:.2f})"
    print(f"| messages/s ({args.messages} messages) | {med['msg direct']:,.0f} | {med['msg front']:,.0f} | "
          f"{r_msg:.2f}x | {by_run('msg')} |")
    print(f"| messages/s, pipelining client (MAIL, RCPT, DATA in one write) | {med['pipe direct']:,.0f} | "
          f"{med['pipe front']:,.0f} | {r_pipe:.2f}x | {by_run('pipe')} |")
    print(f"| TLS handshakes/s ({args.handshakes}) | {med['hs direct']:,.0f} | {med['hs front']:,.0f} | "
          f"{r_hs:.2f}x | {by_run('hs')} |")
    print(f"\nfront RSS per idle connection ({args.idle} open): {rss:.1f} KiB")
    ok = statistics.median(pairs["msg"]) >= 0.8 and statistics.median(pairs["hs"]) >= 0.8
    print(f"goal at least 0.8x on both (messages, handshakes; run by run): {'met' if ok else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
