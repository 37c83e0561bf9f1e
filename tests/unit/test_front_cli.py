"""``requiretls front`` as it runs: a parent and two workers, a stand-in smtpd behind them on a unix socket,
the parent's /metrics adding up the workers' counts, and a worker killed and replaced without the counters
going back."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from requiretls.front.cli import loop_factory
from tests.unit.test_front import FakeSmtpd, fake_smtpd_thread
from tests.unit.tlsutil import client_context, pki

ROOT = Path(__file__).resolve().parents[2]

needs_postconf = pytest.mark.skipif(shutil.which("postconf") is None,
                                    reason="Postfix is not installed (make deps installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(cond: object, what: str, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError):
            if cond():  # type: ignore[operator]
                return
        time.sleep(0.1)
    raise AssertionError(f"timed out: {what}")


def _connects(port: int) -> bool:
    socket.create_connection(("127.0.0.1", port), 1).close()
    return True


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def _workers(pid: int) -> list[int]:
    return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _front_config(tmp_path: Path, port: int, backend: Path, workers: int, metrics: int | None = None) -> Path:
    """A config for ``requiretls front`` on ``port`` with its smtpd at the unix socket ``backend``, the test
    PKI's key, and a main.cf of its own under ``tmp_path`` (for postconf)."""
    (tmp_path / "postfix").mkdir()
    (tmp_path / "postfix" / "main.cf").write_text("compatibility_level = 3.6\n")
    files = pki().files("postfix")
    conf = tmp_path / "requiretls.toml"
    conf.write_text(f'[front]\nlisten = ["127.0.0.1:{port}"]\nbackend = "unix:{backend}"\nworkers = {workers}\n'
                    f'tls_files = ["{files.key}", "{files.cert}"]\npostfix_config_dir = "{tmp_path / "postfix"}"\n'
                    + (f'metrics = "127.0.0.1:{metrics}"\n' if metrics is not None else ""))
    return conf


def _start_front(tmp_path: Path, conf: Path) -> subprocess.Popen[bytes]:
    """``requiretls front --config conf``, its log appended to ``tmp_path``/front.log."""
    return subprocess.Popen([sys.executable, "-m", "requiretls", "front", "--config", str(conf)], cwd=ROOT,
                            stderr=open(tmp_path / "front.log", "ab"))


@pytest.fixture
def front(tmp_path: Path) -> Iterator[tuple[int, int, subprocess.Popen[bytes], FakeSmtpd]]:
    sock = tmp_path / "smtpd.sock"
    port, mport = _free_port(), _free_port()
    conf = _front_config(tmp_path, port, sock, workers=2, metrics=mport)
    with fake_smtpd_thread(sock) as fake:
        proc = _start_front(tmp_path, conf)
        try:
            # The metrics first: the parent serves them after the workers started, on listening sockets it
            # made before; so the one probe of the SMTP port below is the only connection before the test's.
            _wait(lambda: _connects(mport), "the front's metrics")
            _connects(port)
            yield port, mport, proc, fake
        finally:
            proc.terminate()
            proc.wait(15)


def _session(port: int, *, tls: bool, requiretls: bool = False) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=15, local_hostname="client.test") as s:
        if tls:
            s.starttls(context=client_context())
        s.sendmail("a@b.test", ["c@d.test"], b"Subject: x\r\n\r\nbody\r\n",
                   mail_options=["REQUIRETLS"] if requiretls else [])


@needs_postconf
def test_metrics_add_up_the_workers_and_a_replaced_worker_keeps_its_counts(
        front: tuple[int, int, subprocess.Popen[bytes], FakeSmtpd], tmp_path: Path) -> None:
    port, mport, proc, fake = front
    _session(port, tls=True, requiretls=True)
    _session(port, tls=True)
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        _session(port, tls=False, requiretls=True)
    assert refused.value.smtp_code == 555
    assert len(fake.messages) == 2
    want = {
        "requiretls_front_connections_total": 4.0,  # the fixture's probe and three sessions
        "requiretls_front_tls_sessions_total": 2.0,
        "requiretls_front_messages_total{requiretls=yes}": 1.0,
        "requiretls_front_messages_total{requiretls=no}": 1.0,
        "requiretls_front_requiretls_refused_total": 1.0,
        "requiretls_front_sessions": 0.0,
    }
    # The workers publish their counts once a second.
    _wait(lambda: all(_scrape(mport).get(k) == v for k, v in want.items()),
          f"the counts {want}; got {_scrape(mport)}")
    assert _scrape(mport)["requiretls_build_info{daemon=front,python=" + sys.version.split()[0] + ",version=" +
                          __import__("requiretls").__version__ + "}"] == 1.0
    # A worker dies (its counts are in its row); the parent starts another in its place, which goes on from
    # there: nothing counted goes back.
    before = _workers(proc.pid)
    assert len(before) == 2
    # The workers run the event loop the start line names: uvloop where it is installed (its library is then
    # mapped in them), else asyncio's own.
    name = loop_factory()[1]
    assert f"loop={name}" in (tmp_path / "front.log").read_text()
    assert all(("uvloop" in Path(f"/proc/{w}/maps").read_text()) == (name == "uvloop") for w in before)
    os.kill(before[0], signal.SIGKILL)
    _wait(lambda: len(set(_workers(proc.pid)) - set(before)) == 1, "a new worker")
    assert all(_scrape(mport).get(k) == v for k, v in want.items()), _scrape(mport)
    for _ in range(4):  # the kernel hands connections to either worker: both count on
        _session(port, tls=True)
    want["requiretls_front_messages_total{requiretls=no}"] = 5.0
    want["requiretls_front_connections_total"] = 8.0
    want["requiretls_front_tls_sessions_total"] = 6.0
    _wait(lambda: all(_scrape(mport).get(k) == v for k, v in want.items()), f"the counts {want}")


@needs_postconf
def test_sigterm_at_any_moment_of_the_start_stops_every_process(tmp_path: Path) -> None:
    """SIGTERM right as the workers are being made (the parent's handler must never run in a new worker, which
    would then serve on, an orphan holding the port): the front and all its workers are gone within seconds,
    and the port is free again, every time."""
    port = _free_port()
    conf = _front_config(tmp_path, port, tmp_path / "none.sock", workers=16)
    for attempt in range(16):
        proc = _start_front(tmp_path, conf)
        if attempt % 2:
            _wait(lambda: _connects(port), "the front listening")
        else:
            time.sleep(0.2 + 0.02 * attempt)  # somewhere in the start: imports, binding, forking the workers
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        # Nothing still listens: no worker outlived the parent.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), 1).close()
