"""TLS-RPT into one collector (issue 18): tlsrpt-reporter's real tlsrpt-collectd receives Postfix 3.10+'s own
datagrams for an MTA-STS destination (Postfix built with libtlsrpt, reading policyd's TLSRPT attributes) and
the delivery agent's datagrams for its REQUIRETLS sessions.  ``sts-wild.test`` publishes a TLSRPT record."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.plugin import Plugin

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]

COLLECTD = Path(sys.executable).parent / "tlsrpt-collectd"


@pytest.fixture
def collector(plugin: Plugin) -> Iterator[tuple[Path, Path]]:
    if not COLLECTD.exists():
        pytest.skip("tlsrpt-reporter not installed (requirements-dev.txt)")
    d = plugin.dir / "tlsrpt"
    shutil.rmtree(d, ignore_errors=True)  # the instance's directory outlives a session: no old counts
    d.mkdir()
    d.chmod(0o755)
    cfg, sock, db = d / "tlsrpt.cfg", d / "collectd.sock", d / "collectd.sqlite"
    cfg.write_text("[tlsrpt_collectd]\n")
    p = subprocess.Popen([str(COLLECTD), "--config_file", str(cfg), "--storage", f"sqlite://{db}",
                          "--socketname", str(sock), "--socketmode", "0666", "--logfilename", str(d / "collectd.log"),
                          "--pidfilename", str(d / "collectd.pid"), "--sockettimeout", "1",
                          "--max_uncommited_datagrams", "1"])
    deadline = time.monotonic() + 20
    while not sock.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            log = d / "collectd.log"
            raise RuntimeError(f"tlsrpt-collectd did not bind {sock}:\n"
                               + (log.read_text(errors="replace")[-2000:] if log.exists() else ""))
        time.sleep(0.1)
    try:
        yield sock, db
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def _policies(db: Path, domain: str, timeout: float = 30) -> list[tuple[dict[str, object], int, int]]:
    deadline = time.monotonic() + timeout
    rows: list[tuple[str, int, int]] = []
    while time.monotonic() < deadline and not rows:
        if db.exists():
            with sqlite3.connect(db) as con:
                try:
                    rows = con.execute("SELECT policy, cntrtotal, cntrfailure FROM finalresults WHERE domain=?",
                                       (domain,)).fetchall()
                except sqlite3.OperationalError:
                    rows = []
        time.sleep(0.3)
    return [(json.loads(p), t, f) for p, t, f in rows]


def _modern(plugin: Plugin) -> bool:
    major, minor = (int(x) for x in plugin.pf.version.split(".")[:2])
    return (major, minor) >= (3, 10)


def test_postfix_reports_the_mta_sts_policy_policyd_gave_it(plugin: Plugin, collector: tuple[Path, Path]) -> None:
    if not _modern(plugin):
        pytest.skip("TLSRPT is Postfix 3.10+")
    sock, db = collector
    plugin.write_config()
    plugin.start_daemon("policyd")
    plugin.pf.set(smtp_tls_policy_maps=f"socketmap:unix:{plugin.policyd_sock}:default+tlsrpt",
                  smtp_tlsrpt_enable="yes", smtp_tlsrpt_socket_name=str(sock))
    plugin.pf.start()
    q = plugin.pf.submit("alice@sender.test", ["bob@sts-wild.test"])
    plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@sts-wild.test>.*status=sent")
    got = _policies(db, "sts-wild.test")
    assert got, plugin.pf.log()[-3000:]
    (policy, total, failed), *_ = got
    assert policy["policy-type"] == 2 and policy["policy-domain"] == "sts-wild.test", policy
    assert policy["mx-host"] == ["*.sts-wild.test"], policy
    assert "mode: enforce" in policy["policy-string"], policy  # type: ignore[operator]
    assert total >= 1 and failed == 0


def test_the_agent_reports_its_requiretls_session(plugin: Plugin, collector: tuple[Path, Path]) -> None:
    if plugin.pf.version == "3.11":
        pytest.skip("3.11 sends REQUIRETLS itself (Postfix's own TLSRPT)")
    sock, db = collector
    plugin.relay_extra = f'tlsrpt_socket = "{sock}"'
    plugin.table = "sts-wild.test requiretls=yes\n"  # REQUIRETLS by a destination rule (3.7/3.10 have no MAIL FROM one)
    plugin.apply()
    for d in ("milter", "relay", "policyd"):
        plugin.start_daemon(d)
    plugin.pf.start()
    plugin.pf.submit("alice@sender.test", ["bob@sts-wild.test"])
    (d,) = plugin.wait_mx("sts-wild", timeout=60)
    assert d.tls and d.requiretls
    got = _policies(db, "sts-wild.test")
    assert got, plugin.log("relay")[-3000:]
    (policy, total, failed), *_ = got
    assert policy == {"policy-type": 2, "policy-domain": "sts-wild.test",
                      "policy-string": ["version: STSv1", "mode: enforce", "mx: *.sts-wild.test", "max_age: 86400"],
                      "mx-host": ["*.sts-wild.test"]}
    assert (total, failed) == (1, 0)
