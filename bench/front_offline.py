#!/usr/bin/env python3
"""The SMTP front's own cost, without Postfix (issue 20): CPU time of one front worker per message and per
STARTTLS session, with a minimal asyncio SMTP sink behind it (PROXY v2, instant replies; on a unix socket as
the front's default backend, ``--tcp-backend`` for loopback TCP) and the same client load as
``bench/front_vs_postfix.py`` (smtplib, 20 TLS sessions).  No testbed, loopback only, any user.

The sink and the client share the machine with the front, so absolute figures move with what else runs;
compare two versions with ``--compare DIR`` (another checkout's top directory): the two alternate, run after
run, and the medians are printed side by side.  ``--profile FILE`` writes a cProfile of the worker.

``python bench/front_offline.py [--messages 1000] [--handshakes 400] [--runs 3] [--compare DIR] [--tcp-backend]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from benchlib import cpu_seconds, parallel  # noqa: E402

MSG = (b"From: a@sender.test\r\nTo: b@dane.test\r\nSubject: bench\r\n\r\n" + b"x" * 2000 + b"\r\n")
EHLO = (b"250-sink\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n"
        b"250-DSN\r\n250 SMTPUTF8\r\n")


async def _sink_session(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    # (IncompleteReadError: the start-up probe, or a client that went away.)
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        await _sink_dialogue(r, w)
    w.close()


async def _sink_dialogue(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    hdr = await r.readexactly(16)
    await r.readexactly(int.from_bytes(hdr[14:16], "big"))
    w.write(b"220 sink ESMTP\r\n")
    while line := await r.readline():
        verb = line[:4].upper()
        if verb == b"EHLO":
            w.write(EHLO)
        elif verb == b"DATA":
            w.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            while (ln := await r.readline()) and ln != b".\r\n":
                pass
            w.write(b"250 2.0.0 Ok: queued as 4XYZ\r\n")
        elif verb == b"QUIT":
            w.write(b"221 2.0.0 Bye\r\n")
            await w.drain()
            break
        else:
            w.write(b"250 2.1.0 Ok\r\n")
        await w.drain()


def sink(port: int, path: str) -> None:
    async def main() -> None:
        if path:
            srv = await asyncio.start_unix_server(_sink_session, path, backlog=1024)
        else:
            srv = await asyncio.start_server(_sink_session, "127.0.0.1", port, backlog=1024)
        await srv.serve_forever()

    asyncio.run(main())


def front(code: str, port: int, backend: int, path: str, key: str, cert: str, profile: str) -> None:
    """One worker, as ``requiretls front`` runs it, logging to stderr at level info."""
    sys.path.insert(0, code)
    from requiretls.front.cli import tls_context
    from requiretls.front.server import Front, FrontSettings
    from requiretls.log import setup

    setup("front", "stderr", "info")
    from requiretls.front import cli

    # As a worker of ``requiretls front`` sets up its logging (where the code compared has it).
    getattr(cli, "worker_logging", lambda: None)()
    fs = FrontSettings((path, 0) if path else ("127.0.0.1", backend), "front.test", tls_context([key, cert]),
                       max_connections=5000)

    async def main() -> None:
        srv = await Front(fs).start("127.0.0.1", port)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        srv.close()

    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        asyncio.run(main())
        prof.disable()
        prof.dump_stats(profile)
    else:
        asyncio.run(main())


def one_run(code: str, args: argparse.Namespace, key: str, cert: str, ca: str) -> tuple[float, float, float, float]:
    """(messages/s, front us per message, handshakes/s, front us per STARTTLS session)."""
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    backend, port = ports
    path = "" if args.tcp_backend else os.path.join(tempfile.mkdtemp(prefix="front-offline-"), "smtpd")
    me = [sys.executable, __file__]
    sk = subprocess.Popen([*me, "--_sink", str(backend), path])
    fr = subprocess.Popen([*me, "--_front", code, str(port), str(backend), path, key, cert, args.profile or ""],
                          stderr=open(args.log, "ab"))  # noqa: SIM115
    try:
        end = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                if path:
                    with socket.socket(socket.AF_UNIX) as u:
                        u.connect(path)
                else:
                    socket.create_connection(("127.0.0.1", backend), 1).close()
                break
            except OSError:
                if time.monotonic() > end:
                    raise RuntimeError("front or sink did not start") from None
                time.sleep(0.1)
        ctx = ssl.create_default_context(cafile=ca)
        ctx.check_hostname = False
        per_m, per_h = args.messages // args.sessions, args.handshakes // args.sessions

        def messages() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=60, local_hostname="bench.local.test") as s:
                s.starttls(context=ctx)
                for _ in range(per_m):
                    s.sendmail("a@sender.test", ["b@dane.test"], MSG)

        def handshakes() -> None:
            for _ in range(per_h):
                with smtplib.SMTP("127.0.0.1", port, timeout=60, local_hostname="bench.local.test") as s:
                    s.starttls(context=ctx)
                    s.ehlo()

        n_m, n_h = per_m * args.sessions, per_h * args.sessions
        c0 = cpu_seconds(fr.pid)
        t_m = parallel(args.sessions, messages)
        c1 = cpu_seconds(fr.pid)
        t_h = parallel(args.sessions, handshakes)
        c2 = cpu_seconds(fr.pid)
        return n_m / t_m, (c1 - c0) / n_m * 1e6, n_h / t_h, (c2 - c1) / n_h * 1e6
    finally:
        for p in (fr, sk):
            p.send_signal(signal.SIGTERM)
            p.wait(10)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_sink":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sink(int(sys.argv[2]), sys.argv[3])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--_front":
        code, port, backend, path, key, cert, profile = sys.argv[2:9]
        front(code, int(port), int(backend), path, key, cert, profile)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--handshakes", type=int, default=400)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compare", metavar="DIR", help="another checkout to run alternately with this one")
    ap.add_argument("--profile", metavar="FILE", help="cProfile of the front worker (last run)")
    ap.add_argument("--tcp-backend", action="store_true",
                    help="the sink on loopback TCP instead of a unix socket (the front's default wiring)")
    ap.add_argument("--log", default=os.devnull, help="the front's log (default: discarded)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.testbed.pki import make_pki

    pki = make_pki(Path(tempfile.mkdtemp(prefix="front-offline-")))
    files = pki.files("postfix")
    codes = [str(ROOT)] + ([str(Path(args.compare).resolve())] if args.compare else [])
    res: dict[str, list[tuple[float, float, float, float]]] = {c: [] for c in codes}
    for run in range(args.runs):
        for c in codes:
            r = one_run(c, args, str(files.key), str(files.cert), str(pki.ca_cert))
            res[c].append(r)
            print(f"run {run + 1} {c}: {r[0]:.0f} msg/s, {r[1]:.0f} us/msg; {r[2]:.0f} hs/s, {r[3]:.0f} us/hs",
                  file=sys.stderr)
    print(f"\nfront worker CPU, median of {args.runs} runs ({args.sessions} TLS sessions, local sink)\n")
    print("| code | messages/s | CPU per message | STARTTLS sessions/s | CPU per session |")
    print("|---|---:|---:|---:|---:|")
    for c, rs in res.items():
        med = [statistics.median(x[i] for x in rs) for i in range(4)]
        print(f"| {c} | {med[0]:,.0f} | {med[1]:,.0f} us | {med[2]:,.0f} | {med[3]:,.0f} us |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
