#!/usr/bin/env python3
"""The relay agent's own cost, without Postfix or the testbed (issue 16): CPU time of the agent per message, with
an LMTP client standing in for Postfix's lmtp (``--sessions`` connections, as many messages each) and a local
SMTP server with TLS and REQUIRETLS standing in for the MX (aiosmtpd, its own process).  The agent is the real
one (``AgentHandler`` and ``serve``) with one change: the next hop's look-up answers a fixed destination
(127.0.0.1, PKIX against a throw-away CA), so no DNS is needed.  Loopback only, any user.

The MX and the client share the machine with the agent, so absolute figures move with what else runs; compare
two versions with ``--compare DIR`` (another checkout's top directory): the two alternate, run after run.
``--profile FILE`` writes a py-spy profile of the agent (samples of the thread holding the GIL: its CPU).

``python bench/agent_offline.py [--messages 500] [--sessions 10] [--runs 3] [--compare DIR]``
"""

from __future__ import annotations

import argparse
import os
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_seconds, parallel

ROOT = Path(__file__).resolve().parents[1]
NAME = "relay.test"

_MX = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tests.testbed.relay_server import RelayOptions, RelayServer
import ssl
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[3], sys.argv[4])
with RelayServer(ctx, "127.0.0.1", int(sys.argv[2]), RelayOptions(), "relay.test") as r:
    print("ready", flush=True)
    while True:
        time.sleep(3600)
"""

_AGENT = """
import asyncio, logging, sys
sys.path.insert(0, sys.argv[1])
from requiretls.addresses import ListenAddress, NextHop
from requiretls.dest import Destination, DnssecState, MxHost, MxSource, TlsRequirement
from requiretls.dest.destination import DaneState
from requiretls.relay.agent import AgentHandler, AgentSettings, AgentState, serve
from requiretls.relay.deliver import SendSettings

port, cafile, sock = int(sys.argv[2]), sys.argv[3], sys.argv[4]
logging.basicConfig(level=logging.INFO, stream=open(sys.argv[5], "a"))
host = MxHost("relay.test", 0, True, ("127.0.0.1",), DnssecState.SECURE, dane=DaneState.NONE)
dest = Destination("relay.test", MxSource.MX, DnssecState.SECURE, (host,), None, TlsRequirement.OPPORTUNISTIC,
                   "configured next hop", 300)


class Handler(AgentHandler):
    async def _destination(self, target):
        return dest


async def main():
    settings = AgentSettings(relayhost=NextHop.parse(f"[relay.test]:{port}"),
                             send=SendSettings(port=port, timeout=10, cafile=cafile, helo_name="out.example"))
    handler = Handler(None, AgentState(settings))
    asyncio.get_running_loop().set_default_executor(
        __import__("concurrent.futures").futures.ThreadPoolExecutor(settings.max_parallel + 16, "relay"))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(15, stop.set)
    await serve(ListenAddress.parse(f"unix:{sock}"), handler, stop)

asyncio.run(main())
"""


def _message(i: int) -> bytes:
    body = "\r\n".join(f"line {n} of message {i} " + "x" * 50 for n in range(60))
    return (f"From: alice@sender.test\r\nTo: bob@r.example\r\nSubject: bench {i}\r\n"
            f"Received: from x by y with ESMTP id Q{i:08d}\r\n\r\n{body}\r\n").encode()


def one_run(code: str, args: argparse.Namespace, work: Path, port: int, cafile: str, log: str) -> tuple[float, float]:
    """(messages/s, agent us per message)."""
    sock = work / "relay.sock"
    sock.unlink(missing_ok=True)
    agent = subprocess.Popen([sys.executable, "-c", _AGENT, code, str(port), cafile, str(sock), log])
    try:
        end = time.monotonic() + 15
        while not sock.exists():
            if agent.poll() is not None or time.monotonic() > end:
                raise RuntimeError("the agent did not start")
            time.sleep(0.02)
        per = args.messages // args.sessions
        msgs = [_message(i) for i in range(per)]

        def session() -> None:
            with smtplib.LMTP(str(sock)) as c:
                for m in msgs:
                    refused = c.sendmail("alice@sender.test", ["bob@r.example"], m)
                    if refused:
                        raise RuntimeError(f"refused: {refused}")

        parallel(2, session)  # warm-up: TLS context, first sessions to the MX
        spy = None
        if args.profile:
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(agent.pid),
                                    "--gil", "--format", "raw", "--output", args.profile],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        c0 = cpu_seconds(agent.pid)
        took = parallel(args.sessions, session, "sessions")
        c1 = cpu_seconds(agent.pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        n = per * args.sessions
        return n / took, (c1 - c0) / n * 1e6
    finally:
        agent.terminate()
        agent.wait(15)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compare", metavar="DIR", help="another checkout to run alternately with this one")
    ap.add_argument("--profile", metavar="FILE", help="py-spy profile (GIL holder) of the agent, last run")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.dest.support import TestCA

    codes = [str(ROOT)] + ([str(Path(args.compare).resolve())] if args.compare else [])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ca = TestCA()
        cafile = ca.write_root(work / "root.pem")
        leaf = ca.leaf(NAME)
        (work / "mx.pem").write_bytes(leaf.pem)
        (work / "mx.key").write_bytes(leaf.key_pem())
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mx = subprocess.Popen([sys.executable, "-c", _MX, str(ROOT), str(port), str(work / "mx.pem"),
                               str(work / "mx.key")], stdout=subprocess.PIPE, text=True)
        try:
            assert mx.stdout is not None and mx.stdout.readline().strip() == "ready"
            results: dict[str, list[tuple[float, float]]] = {c: [] for c in codes}
            for run in range(args.runs):
                for code in codes:
                    r = one_run(code, args, work, port, cafile, os.devnull)
                    results[code].append(r)
                    print(f"run {run + 1} {code}: {r[0]:,.0f} msg/s, {r[1]:,.0f} us/msg", file=sys.stderr)
        finally:
            mx.terminate()
            mx.wait(15)
    print(f"\nrelay agent CPU, median of {args.runs} runs ({args.messages} messages, {args.sessions} LMTP sessions, "
          "local MX with TLS)\n")
    print("| code | messages/s | agent CPU per message |")
    print("|---|---:|---:|")
    for code, rs in results.items():
        print(f"| {code} | {statistics.median(r[0] for r in rs):,.0f} | "
              f"{statistics.median(r[1] for r in rs):,.0f} us |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
