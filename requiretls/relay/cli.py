"""``requiretls relay``: run the REQUIRETLS delivery agent (LMTP server)."""

from __future__ import annotations

import argparse
import asyncio
import signal

from requiretls.config import _split_hostport, load
from requiretls.log import setup
from requiretls.policyd.server import notify_systemd
from requiretls.relay.agent import AgentSettings, serve
from requiretls.relay.deliver import SendSettings
from requiretls.runtime import destination_resolver


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="config file (default: built-in defaults)")
    p.add_argument("--listen", metavar="SPEC", help="override relay.listen (unix:/path or inet:PORT@HOST)")


def run(args: argparse.Namespace) -> int:
    settings = load(args.config)
    setup("relay", settings.get("log", "target"), settings.get("log", "level"))
    host, port = _split_hostport(settings.get("relay", "reinject"))
    agent = AgentSettings(
        reinject=(host, port or 10026),
        relayhost=settings.get("relay", "relayhost"),
        send=SendSettings(
            helo_name=settings.get("relay", "helo_name"),
            timeout=float(settings.get("relay", "timeout")),
            cafile=settings.get("relay", "cafile") or None,
        ),
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.listen or settings.get("relay", "listen"), destination_resolver(settings), agent, stop,
                    ready=lambda: notify_systemd("READY=1"))

    asyncio.run(main())
    return 0
