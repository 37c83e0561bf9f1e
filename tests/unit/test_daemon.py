"""requiretls.daemon: socket set-up, sd_notify, signals and the SIGHUP reload that every daemon shares."""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from requiretls import daemon
from requiretls.config import Settings
from requiretls.daemon import Reloader, SocketPathError, UnixSocket, prepare_unix_socket


def _stale_socket(path: Path) -> None:
    """A socket file with nobody listening: what a crashed daemon leaves behind."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


def test_prepare_makes_the_missing_directory(tmp_path: Path) -> None:
    sock = tmp_path / "a" / "b" / "x.sock"
    prepare_unix_socket(UnixSocket(str(sock)))
    assert sock.parent.is_dir()
    assert not sock.exists()


def test_prepare_removes_a_stale_socket(tmp_path: Path) -> None:
    sock = tmp_path / "x.sock"
    _stale_socket(sock)
    assert stat.S_ISSOCK(sock.lstat().st_mode)
    prepare_unix_socket(UnixSocket(str(sock)))
    assert not sock.exists()


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_prepare_refuses_to_remove_what_is_not_a_socket(tmp_path: Path, kind: str) -> None:
    sock = tmp_path / "x.sock"
    target = tmp_path / "precious"
    target.write_text("keep me")
    if kind == "file":
        sock.write_text("keep me")
    elif kind == "directory":
        sock.mkdir()
    else:
        sock.symlink_to(target)
    with pytest.raises(SocketPathError, match="not a socket"):
        prepare_unix_socket(UnixSocket(str(sock)))
    assert sock.is_symlink() if kind == "symlink" else sock.exists()
    assert target.read_text() == "keep me"
    if kind == "file":
        assert sock.read_text() == "keep me"


def test_socket_path_error_is_an_oserror_so_the_cli_exits_2() -> None:
    assert issubclass(SocketPathError, OSError)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a directory's group needs root")
def test_prepare_gives_the_directory_the_group_and_the_setgid_bit(tmp_path: Path) -> None:
    group = grp.getgrgid(0).gr_name if os.getegid() != 0 else "daemon"
    gid = grp.getgrnam(group).gr_gid
    sock = tmp_path / "d" / "x.sock"
    prepare_unix_socket(UnixSocket(str(sock), group=group))
    st = sock.parent.stat()
    assert st.st_gid == gid
    assert stat.S_IMODE(st.st_mode) == 0o2755
    _stale_socket(sock)  # a socket made in it inherits the group: Postfix (that group) may connect
    assert sock.lstat().st_gid == gid


def test_prepare_with_an_unknown_group_leaves_the_directory_group_alone(tmp_path: Path) -> None:
    sock = tmp_path / "d" / "x.sock"
    prepare_unix_socket(UnixSocket(str(sock), group="no-such-group-requiretls"))
    assert sock.parent.stat().st_gid == os.getegid()
    assert not stat.S_IMODE(sock.parent.stat().st_mode) & stat.S_ISGID


@pytest.mark.parametrize("mode", [0o660, 0o666, 0o600])
def test_socket_umask_gives_a_library_made_socket_the_mode(tmp_path: Path, mode: int) -> None:
    old = daemon.socket_umask(mode)
    try:
        _stale_socket(tmp_path / "x.sock")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.sock").lstat().st_mode) == mode


def test_set_socket_mode_after_bind(tmp_path: Path) -> None:
    sock = UnixSocket(str(tmp_path / "x.sock"), mode=0o666)
    prepare_unix_socket(sock)
    _stale_socket(tmp_path / "x.sock")
    daemon.set_socket_mode(sock)
    assert stat.S_IMODE((tmp_path / "x.sock").lstat().st_mode) == 0o666


# --- sd_notify ---------------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named in $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield s
    s.close()


def _received(s: socket.socket) -> list[str]:
    out = []
    s.setblocking(False)
    try:
        while True:
            out.append(s.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        s.settimeout(2)
    return out


@pytest.mark.parametrize("state", ["READY=1", "STOPPING=1"])
def test_notify_sends_the_state_to_notify_socket(notify_socket: socket.socket, state: str) -> None:
    assert daemon.notify(state) is True
    assert notify_socket.recv(4096) == state.encode()


def test_notify_reloading_carries_monotonic_usec(notify_socket: socket.socket) -> None:
    assert daemon.notify_reloading() is True
    lines = notify_socket.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, usec = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and int(usec) > 0


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"requiretls-test-{os.getpid()}-{threading.get_ident()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert daemon.notify("READY=1") is True
        assert s.recv(4096) == b"READY=1"


def test_notify_without_systemd_is_a_quiet_no(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert daemon.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert daemon.notify("READY=1") is False


# --- reload ------------------------------------------------------------------------------------------


def _config(tmp_path: Path, table: str) -> Path:
    (tmp_path / "policy").write_text(table)
    (tmp_path / "senders").write_text("@vip.example requiretls=yes\n")
    cfg = tmp_path / "requiretls.toml"
    cfg.write_text('[policy]\ntable = "policy"\nsender_table = "senders"\n')
    return cfg


def test_reload_swaps_in_the_new_tables_and_logs_reload_done(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, notify_socket: socket.socket) -> None:
    cfg = _config(tmp_path, "a.example requiretls=yes\n")
    applied: list[Settings] = []

    def apply(fresh: Settings) -> dict[str, object]:
        applied.append(fresh)
        return daemon.table_sizes(fresh)

    (tmp_path / "policy").write_text("a.example requiretls=yes\nb.example requiretls=yes\n")
    with caplog.at_level(logging.INFO, logger="requiretls"):
        assert Reloader(str(cfg), apply)() is True
    (fresh,) = applied
    assert len(fresh.local_policy.table) == 2
    assert [r.getMessage() for r in caplog.records] == ["reload=done, table_entries=2, sender_entries=1"]
    sent = _received(notify_socket)
    assert sent[0].startswith("RELOADING=1\nMONOTONIC_USEC=") and sent[1:] == ["READY=1"]


def test_reload_of_a_bad_table_keeps_the_old_configuration_and_says_where(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, notify_socket: socket.socket) -> None:
    cfg = _config(tmp_path, "a.example requiretls=yes\n")
    applied: list[Settings] = []
    (tmp_path / "policy").write_text("a.example requiretls=yes\nb.example bogus\n")
    with caplog.at_level(logging.INFO, logger="requiretls"):
        assert Reloader(str(cfg), lambda s: applied.append(s) or {})() is False
    assert applied == []
    (rec,) = caplog.records
    assert rec.levelno == logging.ERROR
    assert rec.getMessage() == (f'reload="failed, keeping the old configuration", '
                                f'error="{tmp_path}/policy:2: b.example: unknown TLS security level \'bogus\'"')
    sent = _received(notify_socket)
    assert sent[0].startswith("RELOADING=1") and sent[1:] == ["READY=1"]  # systemd: back to ready, old config


def test_reload_of_a_bad_config_file_names_file_line_and_key(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(tmp_path, "")
    cfg.write_text('[policy]\ntable = "policy"\noptout_from = "sometimes"\n')
    with caplog.at_level(logging.INFO, logger="requiretls"):
        assert Reloader(str(cfg), lambda s: {})() is False
    assert f'error="{cfg}:3: policy.optout_from: must be one of' in caplog.records[0].getMessage()


def test_reload_that_fails_to_apply_keeps_the_daemon_running(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(tmp_path, "")

    def apply(fresh: Settings) -> dict[str, object]:
        raise ValueError("cannot use it")

    with caplog.at_level(logging.INFO, logger="requiretls"):
        assert Reloader(str(cfg), apply)() is False
    assert caplog.records[0].getMessage() == (
        'reload="failed, keeping the old configuration", error="ValueError: cannot use it"')


def test_sighup_during_a_reload_runs_one_more_reload_instead_of_deadlocking(tmp_path: Path) -> None:
    """In the milter the reload runs in a Python signal handler, and the next SIGHUP's handler can run inside
    it, in the same thread: waiting for the first would wait forever."""
    cfg = _config(tmp_path, "a.example requiretls=yes\n")
    seen: list[int] = []
    results: list[bool] = []

    def apply(fresh: Settings) -> dict[str, object]:
        seen.append(len(fresh.local_policy.table))
        if len(seen) == 1:  # the admin edits the table again and sends SIGHUP while we apply
            (tmp_path / "policy").write_text("a.example requiretls=yes\nb.example requiretls=yes\n")
            results.append(reloader())
        return {}

    reloader = Reloader(str(cfg), apply)
    t = threading.Thread(target=lambda: results.append(reloader()), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the nested reload deadlocked"
    assert seen == [1, 2]  # the second edit was picked up, after the first reload
    assert results == [False, True]  # the nested call left the work to the outer one


# --- signals -----------------------------------------------------------------------------------------


def test_asyncio_daemon_sighup_reloads_and_sigterm_stops() -> None:
    calls: list[str] = []

    async def main() -> None:
        stop = asyncio.Event()
        daemon.install_signals(stop, lambda: calls.append("reload"))
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.01)
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 2)

    asyncio.run(main())
    assert calls == ["reload"]


# In a child process: a stray thread of this test session that does not block SIGTERM could take the
# SIGTERM meant for the fake library and end the session.
_BLOCKING_SERVER = """
import json, os, signal, sys, threading
from requiretls import daemon

taken, reloads, waiting = [], [], threading.Event()
ALL = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}

def serve():
    # What libmilter's smfi_main does: block HUP/TERM/INT, sigwait them, stop on any of them (SIGHUP too).
    signal.pthread_sigmask(signal.SIG_BLOCK, ALL)
    waiting.set()
    taken.append(signal.sigwait(ALL))

def driver():
    signal.pthread_sigmask(signal.SIG_BLOCK, ALL)
    waiting.wait(5)
    for n in range(int(sys.argv[1])):
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(400):
            if len(reloads) > n or taken:
                break
            threading.Event().wait(0.005)
    os.kill(os.getpid(), signal.SIGTERM)

before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
threading.Thread(target=driver, daemon=True).start()
daemon.run_blocking_server(serve, lambda: reloads.append(threading.current_thread().name), "fake-libmilter")
print(json.dumps({"taken": taken, "reloads": reloads,
                  "mask_restored": signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before,
                  "sighup_restored": signal.getsignal(signal.SIGHUP) == signal.SIG_DFL}))
"""


def test_blocking_server_keeps_sighup_for_reload_and_leaves_sigterm_to_the_library() -> None:
    """Every SIGHUP reaches the reload handler (in the main thread), never the library's sigwait, which
    would stop; SIGTERM reaches the library, which stops, and the call returns."""
    r = subprocess.run([sys.executable, "-c", _BLOCKING_SERVER, "50"], capture_output=True, text=True,
                       timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["taken"] == [signal.SIGTERM]
    assert out["reloads"] == ["MainThread"] * 50
    assert out["mask_restored"] and out["sighup_restored"]


def test_blocking_server_raises_what_the_server_raised() -> None:
    def serve() -> None:
        raise OSError("cannot bind")

    with pytest.raises(OSError, match="cannot bind"):
        daemon.run_blocking_server(serve, None)
