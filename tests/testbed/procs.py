"""Daemon processes of the bed: spawn detached, remember by PID, stop by PID only.

The bed must outlive the command that started it (``python -m tests.testbed up``), so every daemon gets
its own session and its PID goes into the state file.  Stopping checks that the PID still runs a command
line naming the bed's state directory and the same start time as when it was spawned, so a recycled PID of
some other process is never signalled.  (The start time, not the command line, decides liveness: reading
``/proc/PID/cmdline`` of a process busy in ``unshare`` can transiently return nothing.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    """A daemon the bed started: its name, PID, and a string its command line must contain."""

    name: str
    pid: int
    marker: str
    start_time: int = 0  # /proc/PID/stat field 22; 0 = unknown (then only the marker is checked)


def spawn(name: str, argv: list[str], log: Path, marker: str, env: dict[str, str] | None = None) -> Proc:
    """Start ``argv`` detached (own session), stdout+stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    return Proc(name, p.pid, marker, start_time(p.pid) or 0)


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    st = _stat(pid)
    return int(st[19]) if st else None


def adopt(name: str, pid: int, marker: str) -> Proc:
    """A Proc for a process the bed did not spawn directly (e.g. a Postfix master)."""
    return Proc(name, pid, marker, start_time(pid) or 0)


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def alive(p: Proc) -> bool:
    st = _stat(p.pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    if p.start_time:
        return int(st[19]) == p.start_time
    cmd = _cmdline(p.pid)
    return cmd is not None and p.marker in cmd


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop(p: Proc, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """``sig`` (SIGTERM), repeated every 0.5 s, then SIGKILL after ``timeout``; a no-op if the PID is not
    ours any more.  Repeating matters for a namespace's PID 1 (the Postfix master): the kernel drops
    signals it has no handler for yet, so a SIGTERM sent during its start-up is silently lost."""
    if not alive(p):
        _reap(p.pid)
        return
    end = time.monotonic() + timeout
    next_signal = 0.0
    while time.monotonic() < end:
        if time.monotonic() >= next_signal:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
            next_signal = time.monotonic() + 0.5
        _reap(p.pid)
        if not alive(p):
            return
        time.sleep(0.02)
    if alive(p):
        os.kill(p.pid, signal.SIGKILL)
        end = time.monotonic() + 5
        while time.monotonic() < end and alive(p):
            _reap(p.pid)
            time.sleep(0.05)


def wait_tcp(
    host: str, port: int, timeout: float = 15.0, proc: Proc | None = None, log: Path | None = None
) -> None:
    """Wait until something accepts on host:port; fail early if ``proc`` died meanwhile."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if proc is not None and not alive(proc):
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{proc.name} exited before listening on {host}:{port}\n{tail}")
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def accepts_unix(path: str | Path) -> bool:
    """Whether something accepts connections on the unix socket ``path`` now (bound is not enough: libmilter
    creates its socket file before it listens)."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def wait_closed(host: str, port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                pass
        except OSError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} still accepting after {timeout}s")
