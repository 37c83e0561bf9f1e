"""``requiretls front``: run the SMTP front (Postfix 3.7-3.10) in front of smtpd.

It takes from Postfix what smtpd itself would use: ``myhostname`` for its trace field, the certificate and key
(``smtpd_tls_chain_files``, else ``smtpd_tls_cert_file`` + ``smtpd_tls_key_file``), ``smtpd_tls_auth_only``
and ``smtpd_timeout``; ``[front]`` keys override.  Without a certificate it does not start (exit 2): a front
that cannot offer STARTTLS could never receive REQUIRETLS and would take TLS away from every client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable

from requiretls import metrics as common
from requiretls.addresses import Backend, Endpoint
from requiretls.config import load
from requiretls.daemon import STOP_SIGNALS, block_stop_signals, install_signals, notify
from requiretls.front.metrics import FrontCollector, SharedCounts
from requiretls.front.server import Front, FrontSettings
from requiretls.log import kv, setup
from requiretls.postfix.apply import PostfixError, postconf

log = logging.getLogger("requiretls")

_PARAMS = ("myhostname", "smtpd_tls_chain_files", "smtpd_tls_cert_file", "smtpd_tls_key_file",
           "smtpd_tls_auth_only", "smtpd_timeout", "queue_directory")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="config file (default: built-in defaults)")
    p.add_argument("--listen", action="append", metavar="ADDR", help="override front.listen (repeat)")
    p.add_argument("--backend", metavar="IP:PORT|unix:PATH", help="override front.backend")


def _seconds(value: str, default: float) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    v = value.strip()
    try:
        return float(v[:-1]) * units[v[-1]] if v and v[-1] in units else float(v)
    except ValueError:
        return default


def postfix_params(config_dir: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in postconf(["-x", *_PARAMS], config_dir or None).splitlines():
        name, _, value = line.partition(" = ")
        out[name.strip()] = value.strip()
    return out


def tls_context(files: list[str]) -> ssl.SSLContext:
    """A server context like smtpd's defaults: TLS >= 1.2 (1.0/1.1 would be below what REQUIRETLS peers use)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    # One TLS 1.3 session ticket per handshake, as smtpd issues (Postfix sets this with its ticket keys;
    # OpenSSL's default is two).  The keys are made here, before the workers fork, so every worker resumes
    # every other's sessions.
    ctx.num_tickets = 1
    if len(files) == 1:
        ctx.load_cert_chain(files[0])
    else:
        for cert, key in zip(files[1::2], files[0::2], strict=False):
            # smtpd_tls_chain_files lists the key before its chain, or a file holding both.
            ctx.load_cert_chain(cert, key)
    return ctx


def build_settings(args: argparse.Namespace) -> tuple[FrontSettings, list[str], int, Endpoint | None]:
    """(the workers' settings, where to listen, how many workers, the metrics address)."""
    settings = load(args.config)
    fc = settings.front
    pf = postfix_params(fc.postfix_config_dir)
    files = list(fc.tls_files)
    if not files:
        chain = pf.get("smtpd_tls_chain_files", "").replace(",", " ").split()
        if chain:
            files = chain
        elif pf.get("smtpd_tls_cert_file") and pf.get("smtpd_tls_key_file"):
            files = [pf["smtpd_tls_key_file"], pf["smtpd_tls_cert_file"]]
    if not files:
        raise PostfixError("no certificate: set smtpd_tls_chain_files (or smtpd_tls_cert_file and "
                           "smtpd_tls_key_file) in main.cf, or front.tls_files")
    auth_only = (pf.get("smtpd_tls_auth_only", "no") == "yes") if fc.auth_only == "auto" else fc.auth_only == "yes"
    backend = Backend.parse(args.backend, 10028) if args.backend else fc.backend
    assert backend is not None
    listen = list(args.listen or fc.listen)
    return FrontSettings(
        backend=((backend.endpoint.host, backend.endpoint.port) if backend.endpoint is not None
                 else (backend.socket_path(pf.get("queue_directory", "/var/spool/postfix")), 0)),
        hostname=fc.hostname or pf.get("myhostname", "localhost"),
        tls=tls_context(files),
        auth_only=auth_only,
        timeout=fc.timeout if fc.timeout != 300.0 else _seconds(pf.get("smtpd_timeout", "300s"), 300.0),
        max_connections=fc.max_connections,
    ), listen, fc.workers or min(os.cpu_count() or 1, 16), fc.metrics


def _listen_socket(spec: str) -> socket.socket:
    a = Endpoint.parse(spec, 25)
    family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((a.host, a.port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def worker_logging() -> None:
    """A worker has one thread: no thread or multiprocessing names in its log records (they cost a few
    microseconds a line, and the format does not use them), nor the caller's file and line (looking them up
    walked the stack for every line; the logging HOWTO's own advice)."""
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None


def loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The workers' event loop: uvloop's where it is installed (Debian's python3-uvloop, which the package
    recommends, or the ``fast`` extra), else asyncio's own; (the factory for :class:`asyncio.Runner`, None for
    asyncio's default; the loop's name for the log).  uvloop's loop is in C: under the 20-session load of
    ``bench/front_vs_postfix.py`` a worker spends less CPU per message and the front keeps more of smtpd's
    rate (docs/benchmarks.md).  The front uses only what both loops have (readiness callbacks, timers,
    futures; its TLS is its own, not the loop's)."""
    try:
        import uvloop
    except ImportError:
        return None, "asyncio"
    return uvloop.new_event_loop, "uvloop"


def _serve(fs: FrontSettings, socks: list[socket.socket], shared: SharedCounts, slot: int) -> None:
    """One worker: an event loop serving every listening socket until SIGTERM; its counts go to its row of
    ``shared`` once a second and at the end."""
    front = Front(fs)
    front.counters = shared.load(slot)
    worker_logging()

    async def main() -> None:
        servers = [await front.start_on(sock) for sock in socks]
        stop = asyncio.Event()
        install_signals(stop, None)
        loop = asyncio.get_running_loop()

        def publish() -> None:
            shared.store(slot, front.counters)
            loop.call_later(1.0, publish)

        publish()
        await stop.wait()
        for srv in servers:
            srv.close()
        shared.store(slot, front.counters)

    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory()[0]) as runner:
        runner.run(main())


def run(args: argparse.Namespace) -> int:
    setup("front", "stderr", "info")
    try:
        fs, listen, workers, metrics = build_settings(args)
    except (PostfixError, OSError, ssl.SSLError, ValueError) as e:
        log.error("%s", kv(front="not starting", error=str(e)))
        return 2
    if not listen:
        log.error("%s", kv(front="not starting", error="front.listen is empty"))
        return 2
    try:
        socks = [_listen_socket(spec) for spec in listen]
    except OSError as e:
        log.error("%s", kv(front="not starting", error=f"cannot listen: {e}"))
        return 2
    # Several workers share the listening sockets (the kernel hands each connection to one of them): TLS and
    # the dialogue use every CPU, as smtpd's processes do.
    per = dataclasses.replace(fs, max_connections=max(1, fs.max_connections // workers))
    children: dict[int, int] = {}  # pid -> worker slot
    shared = SharedCounts(workers)
    stopping = False

    def spawn(slot: int) -> None:
        # SIGTERM and SIGINT wait while the child is made: one that came between the fork and the child's own
        # handlers would run the parent's stop() in the child, which then served on, an orphan holding the port.
        block_stop_signals()
        if stopping:  # a SIGTERM while the workers were being made or remade: no more of them
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            return
        pid = os.fork()
        if pid == 0:
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
                _serve(per, socks, shared, slot)
            finally:
                os._exit(0)
        children[pid] = slot
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(workers):
        spawn(slot)
    if metrics is not None:
        # In the parent, after the workers forked (a thread is better not running at a fork).
        reg = common.registry("front")
        reg.register(FrontCollector(shared))
        # The HTTP thread starts with SIGTERM/SIGINT blocked, so that they always reach the main thread, where
        # spawn() holds them back across a fork.
        block_stop_signals()
        try:
            common.serve(reg, str(metrics))
        except OSError as e:
            log.error("%s", kv(front="not starting", error=f"cannot serve metrics on {metrics}: {e}"))
            stop(signal.SIGTERM, None)
            for pid in list(children):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            return 2
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    log.info("%s", kv(front="listening", on=",".join(listen), backend=fs.backend_text,
                      workers=workers, auth_only="yes" if fs.auth_only else "no", loop=loop_factory()[1]))
    notify("READY=1")
    restarts = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in children:
            continue
        slot = children.pop(pid)
        shared.worker_gone(slot)
        if stopping:
            continue
        # A worker that died took its own sessions with it (their clients retry); the others keep serving.
        log.error("%s", kv(front="worker exited", pid=pid, status=status, action="restarting"))
        restarts += 1
        if restarts > 10 * workers:
            log.error("%s", kv(front="workers keep exiting", action="stopping"))
            stop(signal.SIGTERM, None)
            continue
        time.sleep(1)
        spawn(slot)
    notify("STOPPING=1")
    return 0
