"""``requiretls relay``: run the REQUIRETLS delivery agent (LMTP server).

SIGHUP re-reads the configuration file: the ``[relay]`` settings (relayhost, re-injection address, EHLO name,
timeout, CA file) and the policy tables take effect for the next message, on connections already open too.
The listen address, DNS, MTA-STS and cache settings are read at start only.
"""

from __future__ import annotations

import argparse
import asyncio

from requiretls.addresses import ListenAddress
from requiretls.config import Settings, load
from requiretls.daemon import Reloader, install_signals, table_sizes
from requiretls.dest import Prober, ProbeSettings
from requiretls.log import setup
from requiretls.relay.agent import AgentHandler, AgentSettings, AgentState, serve
from requiretls.relay.deliver import SendSettings
from requiretls.runtime import destination_resolver, trust_resolver


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="config file (default: built-in defaults)")
    p.add_argument("--listen", metavar="SPEC", help="override relay.listen (unix:/path or inet:HOST:PORT)")


def agent_state(settings: Settings) -> AgentState:
    """The agent's reloadable state from a loaded configuration."""
    relay = settings.relay
    return AgentState(
        AgentSettings(
            reinject=relay.reinject,
            reinject_local=relay.reinject_local,
            relayhost=relay.relayhost,
            local_domains=relay.local_domains,
            send=SendSettings(helo_name=relay.helo_name, timeout=relay.timeout, cafile=relay.cafile),
        ),
        settings.local_policy,
    )


def run(args: argparse.Namespace) -> int:
    settings = load(args.config)
    setup("relay", settings.log.target, settings.log.level)

    async def main() -> None:
        relay = settings.relay
        prober = Prober(ProbeSettings(timeout=relay.timeout, cafile=relay.cafile, helo_name=relay.helo_name or None))
        handler = AgentHandler(destination_resolver(settings.dns, settings.mta_sts, settings.cache),
                               agent_state(settings), prober)
        await trust_resolver(handler.resolver, settings.dns, settings.filename)

        def apply(fresh: Settings) -> dict[str, object]:
            handler.state = agent_state(fresh)
            return table_sizes(fresh)

        stop = asyncio.Event()
        install_signals(stop, Reloader(args.config, apply))
        await serve(ListenAddress.parse(args.listen) if args.listen else settings.relay.listen, handler, stop)

    asyncio.run(main())
    return 0
