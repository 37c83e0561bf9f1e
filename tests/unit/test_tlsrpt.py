"""TLS-RPT datagrams of the delivery agent (issue 18), against the real collector: tlsrpt-reporter's
tlsrpt-collectd receives them, its tlsrpt-fetcher and tlsrpt-reportd turn them into an RFC 8460 report, and the
report says what was sent.  The DNS boundary (the TLSRPT record lookup) is faked."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from requiretls.dest.dnssec import DnsAnswer, LookupStatus
from requiretls.facts import DnssecState, SessionResult, SessionStage
from requiretls.relay import tlsrpt
from tests.policyd.fakes import dane, plain, sts

BIN = Path(sys.executable).parent
COLLECTD, FETCHER, REPORTD = (BIN / n for n in ("tlsrpt-collectd", "tlsrpt-fetcher", "tlsrpt-reportd"))
RECORD = "v=TLSRPTv1; rua=mailto:tlsrpt@sts.example"


class FakeDns:
    """``_smtp._tls.sts.example`` and ``_smtp._tls.dane.example`` publish a TLSRPT record; nothing else does."""

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        assert rdtype == "TXT"
        domain = name.removeprefix("_smtp._tls.")
        if domain in ("sts.example", "dane.example"):
            rec = RECORD.replace("sts.example", domain)
            return DnsAnswer(name, "TXT", LookupStatus.ANSWER, DnssecState.INSECURE, 300, name, (rec,))
        return DnsAnswer(name, "TXT", LookupStatus.NXDOMAIN, DnssecState.INSECURE, 300, name)


def _session(host: str, stage: SessionStage, verified: bool = False, verify_error: str = "",
             error: str = "") -> SessionResult:
    return SessionResult(host, "192.0.2.3", 25, stage, connected=True, starttls=stage not in (
        SessionStage.STARTTLS, SessionStage.EHLO, SessionStage.CONNECT), tls_version="TLSv1.3", verified=verified,
        verify_error=verify_error, error=error)


GOOD = _session("mx.sts.example", SessionStage.DONE, verified=True)
EXPIRED = _session("mx.sts.example", SessionStage.HANDSHAKE,
                   verify_error="certificate not valid: certificate has expired")
MISMATCH = _session("mx.sts.example", SessionStage.HANDSHAKE,
                    verify_error="certificate not valid: Hostname mismatch, certificate is not valid for 'x'")
NO_STARTTLS = _session("mx.sts.example", SessionStage.STARTTLS, error="STARTTLS not offered")
DANE_FAIL = _session("mx1.dane.example", SessionStage.AUTHENTICATE, verify_error="DANE: no-match no TLSA matched")
REFUSED = SessionResult("mx.sts.example", "192.0.2.3", 25, SessionStage.CONNECT, transient=True, error="refused")


def test_result_types_of_sessions() -> None:
    assert tlsrpt.failure_code(GOOD) == 0
    assert tlsrpt.failure_code(EXPIRED) == tlsrpt.CERTIFICATE_EXPIRED
    assert tlsrpt.failure_code(MISMATCH) == tlsrpt.CERTIFICATE_HOST_MISMATCH
    assert tlsrpt.failure_code(NO_STARTTLS) == tlsrpt.STARTTLS_NOT_SUPPORTED
    assert tlsrpt.failure_code(DANE_FAIL) == tlsrpt.VALIDATION_FAILURE
    assert tlsrpt.failure_code(_session("mx", SessionStage.HANDSHAKE,
                                        verify_error="certificate not valid: self-signed certificate")) == \
        tlsrpt.CERTIFICATE_NOT_TRUSTED
    assert tlsrpt.failure_code(REFUSED) is None  # never got to TLS: nothing to report


def test_policy_entries() -> None:
    p = tlsrpt.policy(sts("sts.example"), EXPIRED, tlsrpt.CERTIFICATE_EXPIRED)
    assert p["policy-type"] == tlsrpt.POLICY_STS and p["policy-domain"] == "sts.example"
    assert p["mx-host"] == ["mx.sts.example", "*.backup.sts.example"]
    assert "mode: enforce" in p["policy-string"] and (p["t"], p["f"]) == (1, 1)
    assert p["failure-details"] == [{"c": 204, "n": "mx.sts.example", "r": "192.0.2.3",
                                     "a": "certificate not valid: certificate has expired"}]
    d = tlsrpt.policy(dane("dane.example"), DANE_FAIL, tlsrpt.VALIDATION_FAILURE)
    assert d["policy-type"] == tlsrpt.POLICY_TLSA and d["policy-string"] == ["3 1 1 " + "01" * 32]
    n = tlsrpt.policy(plain("signed.example", secure=True), GOOD, 0)
    assert n == {"policy-type": 9, "policy-domain": "signed.example", "t": 0, "f": 0}


def _wait(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.skipif(not COLLECTD.exists(), reason="tlsrpt-reporter not installed (requirements-dev.txt)")
def test_the_real_collector_reports_what_the_agent_sent(tmp_path: Path) -> None:
    cfg = tmp_path / "tlsrpt.cfg"
    cfg.write_text("[tlsrpt_collectd]\n[tlsrpt_fetcher]\n[tlsrpt_reportd]\n")
    sock, db, out = tmp_path / "collectd.sock", tmp_path / "collectd.sqlite", tmp_path / "out"
    out.mkdir()
    collectd = subprocess.Popen(
        [str(COLLECTD), "--config_file", str(cfg), "--storage", f"sqlite://{db}", "--socketname", str(sock),
         "--logfilename", str(tmp_path / "collectd.log"), "--pidfilename", str(tmp_path / "collectd.pid"),
         "--sockettimeout", "1", "--max_uncommited_datagrams", "1"])
    reportd = None
    try:
        _wait(sock.exists, 20, "the collector's socket")

        async def send() -> int:
            reporter = tlsrpt.Reporter(str(sock), FakeDns(), asyncio.get_running_loop())  # type: ignore[arg-type]
            # from a delivery thread, as the agent does
            sessions = [(sts("sts.example"), s) for s in (GOOD, GOOD, EXPIRED, MISMATCH, NO_STARTTLS, REFUSED)]
            sessions += [(dane("dane.example"), DANE_FAIL), (plain("other.example", secure=True), GOOD)]
            for dest, s in sessions:
                await asyncio.to_thread(reporter.session, dest, s)
            await asyncio.sleep(0)
            await reporter.drain()
            return reporter.sent

        assert asyncio.run(send()) == 6  # not the refused connection, not the domain without a TLSRPT record

        def collected() -> int:
            # the collector commits after each datagram: every session it has read so far
            with contextlib.closing(sqlite3.connect(db)) as con:
                try:
                    return int(con.execute("SELECT COALESCE(SUM(cntrtotal), 0) FROM finalresults").fetchone()[0])
                except sqlite3.OperationalError:
                    return 0

        _wait(lambda: db.exists() and collected() == 6, 20, "the collector to read the six datagrams")
        os.kill(collectd.pid, signal.SIGUSR2)  # its day roll-over (for development): today's data becomes complete
        day = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)).strftime("%Y-%m-%d")
        fetcher = f"{FETCHER} --config_file {cfg} --storage sqlite://{db}"

        def listed() -> bool:
            r = subprocess.run([*fetcher.split(), day], capture_output=True, text=True, timeout=30)
            return "sts.example" in r.stdout.split()

        _wait(listed, 20, "the day roll-over")
        reportd = subprocess.Popen(
            [str(REPORTD), "--config_file", str(cfg), "--dbname", str(tmp_path / "reportd.sqlite"),
             "--fetchers", fetcher, "--logfilename", str(tmp_path / "reportd.log"),
             "--pidfilename", str(tmp_path / "reportd.pid"), "--organization_name", "requiretls test",
             "--contact_info", "postmaster@sender.example", "--sender_address", "tlsrpt@sender.example",
             "--debug_send_file_dest", str(out), "--sendmail_script", "cat >/dev/null",
             "--interval_main_loop", "1", "--spread_out_delivery", "1", "--min_wait_delivery", "0",
             "--max_wait_delivery", "1", "--min_wait_domainlist", "0", "--max_wait_domainlist", "1",
             "--min_wait_domaindetails", "0", "--max_wait_domaindetails", "1", "--max_collectd_timeout", "1"])

        def reports() -> dict[str, dict[str, object]]:
            # the debug copy of each report: testreport-DOMAIN-N-mailto:ADDRESS.json
            found = {f.name.split("-")[1]: f for f in out.glob("testreport-*-mailto:*.json")}
            return {d: json.loads(f.read_text()) for d, f in found.items()} if len(found) == 2 else {}

        _wait(lambda: bool(reports()), 60, "tlsrpt-reportd's reports")
        report, dane_report = reports()["sts.example"], reports()["dane.example"]
    finally:
        for p in (reportd, collectd):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    (pol,) = report["policies"]  # type: ignore[misc]
    assert pol["policy"]["policy-type"] == "sts"
    assert pol["policy"]["policy-domain"] == "sts.example"
    assert pol["policy"]["mx-host"] == ["mx.sts.example", "*.backup.sts.example"]
    assert pol["summary"] == {"total-successful-session-count": 2, "total-failure-session-count": 3}
    got = sorted((f["result-type"], f["failed-session-count"], f["receiving-mx-hostname"])
                 for f in pol["failure-details"])
    assert got == [("certificate-expired", 1, "mx.sts.example"), ("certificate-host-mismatch", 1, "mx.sts.example"),
                   ("starttls-not-supported", 1, "mx.sts.example")]
    (dp,) = dane_report["policies"]  # type: ignore[misc]
    assert dp["policy"]["policy-type"] == "tlsa"
    assert dp["policy"]["policy-string"] == ["3 1 1 " + "01" * 32]
    assert dp["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    assert [f["result-type"] for f in dp["failure-details"]] == ["validation-failure"]
