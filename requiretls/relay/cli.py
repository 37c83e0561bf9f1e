"""``requiretls relay``: run the REQUIRETLS delivery agent (LMTP server).

SIGHUP re-reads the configuration file and Postfix's settings (``postconf``, unless
``relay.postfix_settings = false``): the ``[relay]`` settings (relayhost, re-injection address, EHLO name,
timeout, CA file), Postfix's (myhostname, smtp_bind_address, relayhost, the SASL and sender-dependent
relayhost tables, smtp_tls_CAfile/CApath, the mandatory TLS protocols and ciphers, the smtp timeouts, the local
domain lists) and the policy tables take effect for the next message, on connections already open too.  A key
set in requiretls.toml wins over Postfix's value.  The listen address, DNS, MTA-STS, cache, spool directory and
global concurrency limit are read at start only.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import ssl

from requiretls.addresses import ListenAddress
from requiretls.config import RelaySettings, Settings, load
from requiretls.daemon import Reloader, install_signals, table_sizes
from requiretls.dest import Prober, ProbeSettings
from requiretls.dest.session import unverified_context
from requiretls.log import kv, setup
from requiretls.relay import metrics as relay_metrics
from requiretls.relay import tlsrpt as relay_tlsrpt
from requiretls.relay.agent import AgentHandler, AgentSettings, AgentState, serve
from requiretls.relay.deliver import SendSettings, opportunistic_settings
from requiretls.relay.postfix import PostfixCommands, PostfixConfigError, PostfixView
from requiretls.relay.spool import prepare_spool_dir
from requiretls.runtime import destination_resolver, trust_resolver

log = logging.getLogger("requiretls")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="config file (default: built-in defaults)")
    p.add_argument("--listen", metavar="SPEC", help="override relay.listen (unix:/path or inet:HOST:PORT)")


def postfix_view(settings: Settings) -> PostfixView | None:
    """Postfix's settings (``postconf``) when ``relay.postfix_settings``; raises PostfixConfigError."""
    relay = settings.relay
    if not relay.postfix_settings:
        return None
    return PostfixView.read(PostfixCommands(relay.postfix_config_dir, relay.postfix_command_prefix))


def agent_state(settings: Settings, view: PostfixView | None = None) -> AgentState:
    """The agent's reloadable state from a loaded configuration and Postfix's settings (``view``): a key set in
    requiretls.toml wins, an empty one takes Postfix's value."""
    relay = settings.relay
    return AgentState(
        AgentSettings(
            reinject=relay.reinject,
            reinject_local=relay.reinject_local,
            relayhost=relay.relayhost or (view.relayhost if view is not None else None),
            local_domains=relay.local_domains,
            destination_concurrency=relay.destination_concurrency_limit,
            spool_dir=relay.spool_dir,
            max_parallel=relay.concurrency_limit,
            send=send_settings(relay, view),
            postfix=view,
        ),
        settings.local_policy,
    )


def send_settings(relay: RelaySettings, view: PostfixView | None) -> SendSettings:
    """The outbound session settings: the TOML keys, and Postfix's where they are empty.  Postfix's
    smtp_tls_mandatory_protocols / _ciphers only raise the agent's floor (TLS >= 1.2), its smtp_tls_exclude_ciphers
    and smtp_tls_mandatory_exclude_ciphers only remove suites (PostfixConfigError when nothing is left); its
    CApath joins its CAfile (a CA file of relay.cafile replaces both).  Postfix's timeouts are kept within what
    its LMTP client waits for the agent's answer (lmtp_data_done_timeout): connect as smtp_connect_timeout,
    greeting to STARTTLS at most a quarter of it (smtp_helo_timeout), the reply after the dot at most half
    (smtp_data_done_timeout); every other step relay.timeout."""
    if view is None:
        return SendSettings(helo_name=relay.helo_name, timeout=relay.timeout, cafile=relay.cafile)
    lmtp = view.lmtp_data_done_timeout
    send = SendSettings(
        helo_name=relay.helo_name or view.helo_name, timeout=relay.timeout,
        cafile=relay.cafile or view.cafile or None, capath=None if relay.cafile else (view.capath or None),
        bind_address=view.bind_address, bind_address6=view.bind_address6,
        tls_min_version=view.tls_min_version, high_ciphers=view.tls_high_ciphers,
        exclude_ciphers=view.tls_exclude_ciphers, mandatory_exclude_ciphers=view.tls_mandatory_exclude_ciphers,
        opportunistic_min_version=view.tls_opportunistic_min_version,
        opportunistic_high_ciphers=view.tls_opportunistic_high_ciphers,
        connect_timeout=min(view.connect_timeout, lmtp / 4), helo_timeout=min(view.helo_timeout, lmtp / 4),
        data_done_timeout=min(view.data_done_timeout, lmtp / 2))
    try:  # the cipher lists leave something to negotiate (else every delivery would fail at the handshake)
        unverified_context(send)
        unverified_context(opportunistic_settings(send))
    except ssl.SSLError as e:
        raise PostfixConfigError(
            f"smtp_tls_exclude_ciphers = {' '.join(view.tls_exclude_ciphers)}, smtp_tls_mandatory_exclude_ciphers = "
            f"{' '.join(view.tls_mandatory_exclude_ciphers)}: no TLS 1.2 cipher suite left ({e})") from e
    return send


def probe_for(relay: RelaySettings, state: AgentState) -> Prober:
    """The 3.11 pre-check's prober: it judges what Postfix's own client will find, so it trusts what the
    agent's sessions trust (relay.cafile, else Postfix's smtp_tls_CAfile and smtp_tls_CApath) and says
    Postfix's EHLO name."""
    send = state.settings.send
    return Prober(ProbeSettings(timeout=relay.timeout, cafile=send.cafile, capath=send.capath,
                                helo_name=send.helo_name or None))


def _describe(state: AgentState) -> dict[str, object]:
    s = state.settings
    if s.postfix is None:
        return {"postfix_settings": "off"}
    return {"helo": s.send.helo_name, "relayhost": ",".join(map(str, s.relayhost if isinstance(s.relayhost, tuple)
                                                              else [s.relayhost] if s.relayhost else [])) or "-",
            "bind": s.send.bind_address or "-", "sasl": "on" if s.postfix.sasl_maps else "off",
            "sender_relayhost_maps": "on" if s.postfix.sender_relayhost_maps else "off"}


def run(args: argparse.Namespace) -> int:
    settings = load(args.config)
    setup("relay", settings.log.target, settings.log.level)
    try:
        state = agent_state(settings, postfix_view(settings))
    except PostfixConfigError as e:
        log.error("%s", kv(error=f"cannot read Postfix's settings: {e}",
                           hint="set relay.postfix_config_dir / postfix_command_prefix, or postfix_settings = false"))
        return 1
    log.info("%s", kv(postfix_settings="read", **_describe(state)))
    try:
        left = prepare_spool_dir(settings.relay.spool_dir)
    except OSError as e:
        log.error("%s", kv(error=f"spool directory {settings.relay.spool_dir}: {e}",
                           hint="set relay.spool_dir to a directory the agent can write"))
        return 1
    if left:
        log.warning("%s", kv(spool_dir=settings.relay.spool_dir, removed=left, note="spool files left by a crash"))

    if settings.relay.metrics is not None:
        relay_metrics.start(str(settings.relay.metrics))

    async def main() -> None:
        relay = settings.relay
        handler = AgentHandler(destination_resolver(settings.dns, settings.mta_sts, settings.cache), state,
                               probe_for(relay, state))
        # Deliveries, re-injections and table look-ups run in threads: enough of them for the global limit of
        # deliveries plus the rest (the default pool has os.cpu_count() + 4, which capped deliveries at 6 on a
        # 2-CPU host whatever the limits said).
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(state.settings.max_parallel + 16, "relay"))
        await trust_resolver(handler.resolver, settings.dns, settings.filename)
        if relay.tlsrpt_socket:
            relay_tlsrpt.start(relay.tlsrpt_socket, handler.resolver.dns, asyncio.get_running_loop())

        def apply(fresh: Settings) -> dict[str, object]:
            state = agent_state(fresh, postfix_view(fresh))  # PostfixConfigError: the old state stays
            handler.state = state
            handler.prober = probe_for(fresh.relay, state)
            return {**table_sizes(fresh), **_describe(state)}

        stop = asyncio.Event()
        install_signals(stop, Reloader(args.config, apply))
        try:
            await serve(ListenAddress.parse(args.listen) if args.listen else settings.relay.listen, handler, stop)
        finally:
            handler.sessions.prune(everything=True)  # QUIT to the MXs whose sessions were kept open

    asyncio.run(main())
    return 0
