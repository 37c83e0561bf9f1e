"""``requiretls relay``: run the REQUIRETLS delivery agent (LMTP server)."""

from __future__ import annotations

import argparse
import asyncio
import signal

from requiretls.addresses import ListenAddress
from requiretls.config import load
from requiretls.log import setup
from requiretls.policyd.server import notify_systemd
from requiretls.relay.agent import AgentSettings, serve
from requiretls.relay.deliver import SendSettings
from requiretls.runtime import destination_resolver


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="config file (default: built-in defaults)")
    p.add_argument("--listen", metavar="SPEC", help="override relay.listen (unix:/path or inet:HOST:PORT)")


def run(args: argparse.Namespace) -> int:
    settings = load(args.config)
    relay = settings.relay
    setup("relay", settings.log.target, settings.log.level)
    agent = AgentSettings(
        reinject=relay.reinject,
        relayhost=relay.relayhost,
        send=SendSettings(
            helo_name=relay.helo_name,
            timeout=relay.timeout,
            cafile=relay.cafile,
        ),
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(ListenAddress.parse(args.listen) if args.listen else relay.listen,
                    destination_resolver(settings.dns, settings.mta_sts, settings.cache), agent, stop,
                    ready=lambda: notify_systemd("READY=1"))

    asyncio.run(main())
    return 0
