"""What the three daemons (milter, policyd, relay) share: unix socket set-up, sd_notify(3), signals, reload.

* :func:`prepare_unix_socket` makes a socket's directory (setgid to the group Postfix runs as, when we are
  root), removes a stale socket left by a crash and refuses to remove anything that is not a socket.
* :func:`notify` is sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET``.
* :func:`install_signals` gives an asyncio daemon SIGTERM/SIGINT (stop) and SIGHUP (reload).
* :func:`run_blocking_server` runs a server whose library takes the stop signals itself (libmilter), with
  SIGHUP still ours; see its docstring for why that works.
* :class:`Reloader` re-reads the configuration file on SIGHUP and swaps the new state in, or keeps the old
  one when the file is bad; either way one log line, ``reload=done, ...`` or
  ``reload="failed, keeping the old configuration", error=...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any

from requiretls.config import Settings, load
from requiretls.errors import ConfigError
from requiretls.log import kv

log = logging.getLogger("requiretls")


class SocketPathError(OSError):
    """A socket path is taken by something that is not a socket: we never delete it."""


@dataclass(frozen=True, slots=True)
class UnixSocket:
    """Where a unix socket goes and who may connect: ``group`` owns the directory (setgid, so the socket
    inherits it; "" leaves the directory's group alone), ``mode`` is the socket's own mode (set by
    :func:`set_socket_mode` once it exists, or beforehand through :func:`socket_umask`)."""

    path: str
    mode: int = 0o660
    group: str = ""


def prepare_unix_socket(sock: UnixSocket) -> None:
    """Make the directory of ``sock.path`` and remove a stale socket file left by a crash.

    Postfix's smtpd, cleanup and lmtp run as ``postfix``: as root, the directory is given ``sock.group`` with
    the setgid bit (mode 2755), so the socket created in it belongs to that group.  A file at the path that
    is not a socket is an admin's file or a typo in the configuration: :class:`SocketPathError`, untouched.
    """
    directory = os.path.dirname(sock.path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    gid = -1
    if sock.group:
        with contextlib.suppress(KeyError):
            gid = grp.getgrnam(sock.group).gr_gid
    if gid >= 0 and os.geteuid() == 0:
        os.chown(directory, -1, gid)
        os.chmod(directory, 0o2755)
    try:
        st = os.lstat(sock.path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{sock.path}: exists and is not a socket; not removing it")
    os.unlink(sock.path)


def set_socket_mode(sock: UnixSocket) -> None:
    """Give the socket we just created (bind) its mode."""
    os.chmod(sock.path, sock.mode)


def socket_umask(mode: int) -> int:
    """Set the process umask so that a socket created by a library (libmilter) gets ``mode``; the old umask."""
    return os.umask(0o777 & ~mode)


def notify(state: str) -> bool:
    """sd_notify(3): send ``state`` (``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ...) to ``$NOTIFY_SOCKET``.

    A path or an abstract socket (``@name``).  False when there is no socket or it cannot be reached: not
    being supervised by systemd is normal, and a notification is never worth stopping a daemon for.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:
        return False
    return True


def notify_reloading() -> bool:
    """``RELOADING=1`` with the ``MONOTONIC_USEC`` that systemd's ``Type=notify-reload`` requires with it."""
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")


class Reloader:
    """SIGHUP: load the configuration file again and hand the result to ``apply``.

    ``apply`` swaps the new state in (one attribute assignment: connections in progress keep running) and
    returns what to log with ``reload=done``.  A file that does not load (:class:`ConfigError`: file, line,
    key) keeps the old state running.  systemd hears ``RELOADING=1`` then ``READY=1``.
    """

    def __init__(self, config_file: str | None, apply: Callable[[Settings], Mapping[str, object]]) -> None:
        self.config_file = config_file
        self.apply = apply
        self._busy = threading.Lock()
        self._wanted = False

    def __call__(self) -> bool:
        """Reload; True if a new configuration is in use.

        A SIGHUP that arrives during a reload (a Python signal handler can run inside the one before it, in
        the same thread) does not wait for it, which would deadlock: it asks for one more round, and the
        reload in progress runs it once it is done, so the last change to the files is never missed.
        """
        self._wanted = True
        ok = False
        while self._wanted:
            if not self._busy.acquire(blocking=False):
                return False  # the reload in progress does this one too
            try:
                while self._wanted:
                    self._wanted = False
                    ok = self._reload()
            finally:
                self._busy.release()
        return ok

    def _reload(self) -> bool:
        notify_reloading()
        try:
            try:
                fresh = load(self.config_file)
            except ConfigError as e:
                log.error("%s", kv(reload="failed, keeping the old configuration", error=str(e)))
                return False
            try:
                details = self.apply(fresh)
            except Exception as e:  # a reload must never take the daemon down
                log.error("%s", kv(reload="failed, keeping the old configuration",
                                   error=f"{type(e).__name__}: {e}"))
                return False
            log.info("%s", kv(reload="done", **details))
            return True
        finally:
            notify("READY=1")


def table_sizes(settings: Settings) -> dict[str, object]:
    """The ``reload=done`` details every daemon logs: how many entries each table has now."""
    p = settings.local_policy
    return {"table_entries": len(p.table), "sender_entries": len(p.senders)}


def install_signals(stop: asyncio.Event, reload: Callable[[], object] | None = None) -> None:
    """In the running loop: SIGTERM and SIGINT set ``stop``; SIGHUP calls ``reload`` (in the loop's thread,
    between two callbacks, so no connection is interrupted)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)


STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def block_stop_signals() -> None:
    """Block SIGTERM and SIGINT in the calling thread and so in every thread it starts from now on: for a
    daemon whose library waits for them itself (:func:`run_blocking_server`), call it before starting any
    thread of your own, or the kernel may hand SIGTERM to that thread, and the process dies on the spot."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def run_blocking_server(serve: Callable[[], None], reload: Callable[[], object] | None,
                        name: str = "server", stop: Callable[[], None] | None = None) -> None:
    """Run ``serve`` (a library's blocking main loop that handles SIGTERM/SIGINT itself) with SIGHUP ours.

    libmilter's ``smfi_main`` blocks SIGHUP, SIGTERM and SIGINT in the thread that calls it (so in every
    thread it starts) and ``sigwait``\\ s them in a signal thread of its own, where SIGHUP means *stop*: a
    Python handler for SIGHUP never runs and ``kill -HUP`` ends the milter.  So ``serve`` runs in a second
    thread, and the main thread, which libmilter never touches, keeps SIGHUP unblocked with our handler.
    Linux gives a process-directed signal (``kill PID``) to the thread-group leader, the main thread, whenever
    that thread does not block it, so SIGHUP always reaches our handler and never libmilter's signal thread.
    The main thread blocks SIGTERM and SIGINT instead, so they go to libmilter's thread and stop it as
    libmilter intends (it stops accepting, then returns); threads started earlier must block them too
    (:func:`block_stop_signals`).  Must be called from the main thread.

    With ``stop``, SIGTERM and SIGINT are the main thread's too, and call ``stop``: for a library whose own
    stop takes a while (libmilter notices its stop flag only when its listener wakes, up to 5 s later), ``stop``
    can set the flag and wake it.  The serving thread keeps them blocked.
    """
    failure: list[BaseException] = []

    def target() -> None:
        try:
            serve()
        except BaseException as e:  # handed to the main thread, which raises it
            failure.append(e)

    previous = signal.getsignal(signal.SIGHUP)
    previous_stop: dict[signal.Signals, Any] = {}
    if reload is not None:
        def on_sighup(signum: int, frame: FrameType | None) -> None:
            reload()

        signal.signal(signal.SIGHUP, on_sighup)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # The thread inherits this mask: SIGTERM and SIGINT blocked (libmilter's sigwait takes them), SIGHUP not.
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        if stop is not None:
            def on_stop(signum: int, frame: FrameType | None) -> None:
                stop()

            for sig in STOP_SIGNALS:
                previous_stop[sig] = signal.signal(sig, on_stop)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        while thread.is_alive():
            # A signal interrupts the wait at once; the timeout only bounds how late a handler could run.
            thread.join(1.0)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for sig, handler in previous_stop.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if reload is not None:
            signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)
    if failure:
        raise failure[0]
