"""Acceptance tests of the testbed itself (issue 3): every later acceptance point stands on these parts.

Each test checks a real outcome (resolver AD bit, certificate verification, what an MX recorded, what
Postfix logged), so a broken bed fails here first instead of confusing a feature test.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import smtplib
import socket
import ssl
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from tests.conftest import HOST_RESOLV, host_resolv_hash_at_start
from tests.testbed import procs
from tests.testbed.bed import Bed, listening_sockets
from tests.testbed.dns import query
from tests.testbed.hosts import DOMAINS, HTTPS_IP, MX_HOSTS, Cert, Dnssec, StsHttp, domain_mx_hosts
from tests.testbed.postfix import Postfix, available_versions
from tests.testbed.records import CutRule
from tests.testbed.services import OVERSIZE_BYTES, POLICY_PATH

SENDER = "alice@sender.test"


def _rdatas(r: dns.message.Message, rdtype: str) -> list:  # type: ignore[type-arg]
    t = dns.rdatatype.from_text(rdtype)
    return [rr for rrset in r.answer if rrset.rdtype == t for rr in rrset]


# --- DNS ----------------------------------------------------------------------------------------------


@pytest.mark.testbed
@pytest.mark.parametrize("domain", [d for d in DOMAINS if d.mx], ids=lambda d: d.domain)
def test_resolver_outcome_matches_zone_kind(bed: Bed, domain: object) -> None:
    """RFC 4035 section 3.2.3 / 4033 section 5: AD only for secure data; bogus is SERVFAIL."""
    d = domain
    assert hasattr(d, "dnssec")
    r = query(d.name, "MX")
    ad = bool(r.flags & dns.flags.AD)
    if d.dnssec is Dnssec.SECURE:
        assert r.rcode() == dns.rcode.NOERROR and ad and r.answer
    elif d.dnssec is Dnssec.INSECURE:
        assert r.rcode() == dns.rcode.NOERROR and not ad and r.answer
    elif d.dnssec is Dnssec.BOGUS:
        assert r.rcode() == dns.rcode.SERVFAIL
    for m in domain_mx_hosts(d):
        a = query(m.fqdn, "A")
        if d.dnssec is Dnssec.BOGUS:
            assert a.rcode() == dns.rcode.SERVFAIL
            continue
        assert [rr.address for rr in _rdatas(a, "A")] == [m.ip]
        if d.tlsa:
            t = query(f"_25._tcp.{m.fqdn}", "TLSA")
            assert t.flags & dns.flags.AD
            digests = [rr.cert.hex() for rr in _rdatas(t, "TLSA")]
            if d.tlsa_mismatch:
                assert digests == ["00" * 32]
            else:
                assert digests == [bed.pki.mx(m.key).spki_sha256]


@pytest.mark.testbed
def test_servfail_domain_and_names_outside_test_tld(bed: Bed) -> None:
    t0 = time.monotonic()
    assert query("servfail.test.", "MX").rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - t0 < 3, "a lame delegation must fail fast"
    # Nothing leaves loopback: our root answers for the whole name space, with a signed denial.
    r = query("example.com.", "A")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.flags & dns.flags.AD
    r = query("nonexistent.test.", "A")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.flags & dns.flags.AD


@pytest.mark.testbed
def test_servfail_toggle_at_run_time(bed: Bed) -> None:
    assert query("toggle.test.", "MX").flags & dns.flags.AD
    with bed.dns.servfail("toggle.test"):
        assert query("toggle.test.", "MX").rcode() == dns.rcode.SERVFAIL
        assert query("mx.toggle.test.", "A").rcode() == dns.rcode.SERVFAIL
        assert query("dane.test.", "MX").flags & dns.flags.AD  # only that zone
    r = query("toggle.test.", "MX")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AD


@pytest.mark.testbed
def test_sts_txt_records(bed: Bed) -> None:
    for d in DOMAINS:
        if d.sts is None:
            continue
        r = query(f"_mta-sts.{d.name}", "TXT")
        txts = sorted(b"".join(rr.strings).decode() for rr in _rdatas(r, "TXT"))
        assert txts == sorted(d.sts.txt)
        a = query(f"mta-sts.{d.name}", "A")
        assert [rr.address for rr in _rdatas(a, "A")] == [HTTPS_IP]


# --- MX servers ---------------------------------------------------------------------------------------


def _verify_outcome(ca: Path, host: str, ip: str) -> str:
    """'ok' or the reason PKIX verification of the MX certificate fails (like an MTA-STS client)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with smtplib.SMTP(ip, 25, timeout=10) as s:
            s._host = host  # smtplib takes the SNI / verification name from here
            s.starttls(context=ctx)
            s.ehlo()
        return "ok"
    except ssl.SSLCertVerificationError as e:
        return e.verify_message


@pytest.mark.testbed
@pytest.mark.parametrize("mx", MX_HOSTS, ids=lambda m: m.key)
def test_mx_flavour(bed: Bed, mx: object) -> None:
    m = mx
    assert hasattr(m, "fqdn")
    rec = bed.mx(m.key)
    rec.clear()
    with smtplib.SMTP(m.ip, 25, timeout=10) as s:
        s.ehlo("client.test")
        assert s.has_extn("starttls") == m.starttls
        assert not s.has_extn("requiretls"), "REQUIRETLS must never be offered in plaintext"
        code, _ = s.mail(SENDER, ["REQUIRETLS"])
        assert code == 555
        s.rset()
        if m.starttls:
            s.starttls(context=ssl._create_unverified_context())
            s.ehlo("client.test")
            assert s.has_extn("requiretls") == m.requiretls
        opts = ["REQUIRETLS", "ENVID=Case-Kept"] if m.requiretls else ["ENVID=Case-Kept"]
        assert s.mail(SENDER, opts)[0] == 250
        assert s.rcpt(f"user@{m.hostname.split('.', 1)[1]}", ["NOTIFY=NEVER"])[0] == 250
        assert s.rcpt("reject-me@x.test")[0] == 550
        assert s.rcpt("defer-me@x.test")[0] == 450
        assert s.data(b"Subject: flavour\r\n\r\nbody\r\n")[0] == 250
    (d,) = rec.wait_for(1, timeout=5)
    assert d.tls == m.starttls
    assert d.tls_version == ("TLSv1.3" if m.starttls else None)
    assert d.requiretls == m.requiretls
    assert "ENVID=Case-Kept" in d.mail_options
    assert d.rcpt_options == ("NOTIFY=NEVER",)
    assert d.header("Subject") == ["flavour"]
    end = time.monotonic() + 5
    while not rec.connections() and time.monotonic() < end:
        time.sleep(0.05)
    (c,) = rec.connections()
    assert c.delivered == 1 and c.commands[0] == "EHLO client.test"
    if m.starttls:
        expected = {
            Cert.GOOD: "ok",
            Cert.EXPIRED: "certificate has expired",
            Cert.WRONG_NAME: f"Hostname mismatch, certificate is not valid for '{m.hostname}'.",
            Cert.SELF_SIGNED: "self-signed certificate",
        }[m.cert]
        assert _verify_outcome(bed.pki.ca_cert, m.hostname, m.ip) == expected


def _send_one(ip: str, helo: str, tls: bool, n: int, size: int | None = None, rcpt: str = "user@x.test") -> str:
    """One message on its own connection; "sent", or the error text if the connection broke."""
    msg = f"Subject: cut {n}\r\nX-Cut-Id: {n}\r\n\r\n".encode() + (b"y" * 70 + b"\r\n") * 80
    try:
        with smtplib.SMTP(ip, 25, timeout=10) as s:
            s.ehlo(helo)
            if tls:
                s.starttls(context=ssl._create_unverified_context())
                s.ehlo(helo)
            assert s.mail(SENDER, [f"SIZE={size}"] if size else [])[0] == 250
            assert s.rcpt(rcpt)[0] == 250
            code, _ = s.data(msg)
            assert code == 250
            return "sent"
    except (smtplib.SMTPServerDisconnected, ConnectionError) as e:
        return f"broken: {e}"


@pytest.mark.testbed
@pytest.mark.parametrize("key", ["dane", "plain"])
def test_mx_data_cut_fault(bed: Bed, key: str) -> None:
    """The data-cut switch (soak): every 2nd DATA from "cut.test", twice, is reset after part of the message,
    without a reply and without a delivery; other clients and later transactions are delivered."""
    rec = bed.mx(key)
    rec.clear()
    tls = key != "plain"
    ip = next(m.ip for m in MX_HOSTS if m.key == key)
    rec.cut_data(CutRule(count=2, every=2, helo="cut.test", after_bytes=300))
    try:
        got = [_send_one(ip, "cut.test", tls, n) for n in range(1, 6)]
        other = _send_one(ip, "other.test", tls, 9)
    finally:
        rec.cut_data()
    assert got[0] == got[2] == got[4] == other == "sent", got
    for g in (got[1], got[3]):
        # An RST: ECONNRESET in plaintext; Python's ssl reports a reset under TLS as EOF ("unexpectedly closed").
        assert g.startswith("broken:") and (tls or "reset" in g.lower()), got
    ids = sorted(d.header("X-Cut-Id")[0] for d in rec.wait_for(4, timeout=5))
    assert ids == ["1", "3", "5", "9"]
    cuts = rec.cuts()
    assert [c.partial.split(b"\r\n")[1] for c in cuts] == [b"X-Cut-Id: 2", b"X-Cut-Id: 4"]
    for c in cuts:
        assert c.helo == "cut.test" and c.tls == tls and not c.dot_seen and 300 <= c.bytes_read < 1000
    end = time.monotonic() + 5
    while len(rec.connections()) < 6 and time.monotonic() < end:
        time.sleep(0.05)
    cut_conns = [c for c in rec.connections() if any(x.startswith("CUT after") for x in c.commands)]
    assert len(cut_conns) == 2 and all(c.delivered == 0 for c in cut_conns)
    rec.cut_data(CutRule(count=1, min_size=20_000))  # a fresh arming counts afresh
    assert _send_one(ip, "cut.test", tls, 10) == "sent"
    assert _send_one(ip, "cut.test", tls, 11, size=19_999) == "sent"
    assert _send_one(ip, "cut.test", tls, 12, size=20_000).startswith("broken:")
    assert [c.size for c in rec.cuts()] == [None, None, 20_000]
    rec.cut_data(CutRule(count=1, rcpt_prefix="big"))
    assert _send_one(ip, "cut.test", tls, 13, rcpt="small@x.test") == "sent"
    assert _send_one(ip, "cut.test", tls, 14, rcpt="Big-1@x.test").startswith("broken:")
    assert [c.rcpt_tos for c in rec.cuts()][-1] == ("Big-1@x.test",)
    rec.cut_data(CutRule(count=1))  # clear() disarms
    rec.clear()
    assert _send_one(ip, "cut.test", tls, 7) == "sent" and not rec.cuts()


# --- MTA-STS HTTPS ------------------------------------------------------------------------------------


def _fetch_policy(ca: Path, host: str) -> tuple[int, str, int, str]:
    ctx = ssl.create_default_context(cafile=str(ca))
    sock = socket.create_connection((HTTPS_IP, 443), timeout=10)
    conn = http.client.HTTPSConnection(host, 443, context=ctx, timeout=10)
    conn.sock = ctx.wrap_socket(sock, server_hostname=host)
    conn.request("GET", POLICY_PATH)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, r.getheader("Content-Type", ""), len(body), r.getheader("Location", "")


@pytest.mark.testbed
@pytest.mark.parametrize("domain", [d for d in DOMAINS if d.sts], ids=lambda d: d.domain)
def test_mta_sts_policy_host(bed: Bed, domain: object) -> None:
    d = domain
    assert hasattr(d, "sts") and d.sts is not None
    host = f"mta-sts.{d.domain}"
    if d.sts.http is StsHttp.BAD_CERT:
        with pytest.raises(ssl.SSLCertVerificationError):
            _fetch_policy(bed.pki.ca_cert, host)
        return
    status, ctype, size, location = _fetch_policy(bed.pki.ca_cert, host)
    if d.sts.http is StsHttp.REDIRECT:
        assert status == 301 and location.startswith("https://mta-sts.sts.test/")
        return
    assert status == 200
    assert ctype == ("text/html" if d.sts.http is StsHttp.MEDIA_TYPE else "text/plain")
    if d.sts.http is StsHttp.OVERSIZE:
        assert size > OVERSIZE_BYTES > 65536
    else:
        assert size < 1000


# --- Postfix ------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_dane_delivery_and_bogus_deferral(bed: Bed, postfix: Postfix) -> None:
    """RFC 7672: a DANE-verified delivery; a bogus zone is deferred, nothing ever reaches its MX."""
    postfix.set(smtp_tls_security_level="dane", smtp_dns_support_level="dnssec")
    postfix.start()
    ok = postfix.submit(SENDER, ["bob@dane.test"])
    line = postfix.wait_log(rf"{ok.queue_id}: to=<bob@dane.test>.*status=", timeout=30).line
    assert "status=sent" in line and "relay=mx.dane.test[127.0.2.1]:25" in line
    assert postfix.find_log(r"Verified TLS connection established to mx\.dane\.test\[127\.0\.2\.1\]:25")
    (d,) = bed.mx("dane").wait_for(1)
    assert d.tls and d.tls_version in ("TLSv1.2", "TLSv1.3")
    assert d.rcpt_tos == ("bob@dane.test",) and d.mail_from == SENDER

    bad = postfix.submit(SENDER, ["bob@bogus.test"])
    line = postfix.wait_log(rf"{bad.queue_id}: to=<bob@bogus.test>.*status=", timeout=30).line
    assert "status=deferred" in line and "dsn=4.4.3" in line
    mark = postfix.log_mark()
    postfix.flush()
    # the retry the flush asked for: deferred again, and back in the deferred queue
    line = postfix.wait_log(rf"{bad.queue_id}: to=<bob@bogus.test>.*status=", timeout=30, since=mark).line
    assert "status=deferred" in line and "dsn=4.4.3" in line
    end = time.monotonic() + 30
    while "deferred/" not in postfix.postcat(bad.queue_id, "-e"):
        assert time.monotonic() < end, postfix.postcat(bad.queue_id, "-e")
        time.sleep(0.2)
    assert bad.queue_id in postfix.queue_ids()
    assert bed.mx("bogus").deliveries() == [] and bed.mx("bogus").connections() == []


@pytest.mark.e2e
def test_servfail_toggle_defers_then_delivers(bed: Bed, postfix: Postfix) -> None:
    """The run-time SERVFAIL switch reaches Postfix's own resolver path (libc stub via the bind-mounted
    resolv.conf): deferred 4.4.3 while on, delivered over verified DANE after switching back and a flush."""
    postfix.start()
    with bed.dns.servfail("toggle.test"):
        q = postfix.submit(SENDER, ["carol@toggle.test"])
        line = postfix.wait_log(rf"{q.queue_id}: to=<carol@toggle.test>.*status=", timeout=30).line
        assert "status=deferred" in line and "dsn=4.4.3" in line
    mark = postfix.log_mark()
    postfix.flush()
    line = postfix.wait_log(rf"{q.queue_id}: to=<carol@toggle.test>.*status=", timeout=30, since=mark).line
    assert "status=sent" in line
    (d,) = bed.mx("toggle").wait_for(1)
    assert d.tls and d.rcpt_tos == ("carol@toggle.test",)
    postfix.wait_queue_empty(10)


@pytest.mark.e2e
def test_postfix_config_hooks_and_namespace(bed: Bed, postfix: Postfix) -> None:
    """Settings and services added before start are live; the instance resolves via the test Unbound
    while the host's resolv.conf stays as it was."""
    extra = postfix.ports.extra[0]
    postfix.set(smtpd_banner="$myhostname ESMTP testbed-hook")
    postfix.add_service(f"127.0.0.1:{extra}", "inet", "inet n - n - - smtpd -o syslog_name=postfix/extra")
    out = postfix.run_host(["sh", "-c", 'echo "$MAIL_CONFIG"']).stdout.strip()
    assert out == str(postfix.config_dir)
    postfix.start()
    procs.wait_tcp("127.0.0.1", extra, timeout=10)
    with smtplib.SMTP(timeout=10) as s:
        code, greeting = s.connect("127.0.0.1", extra)
        assert code == 220 and b"testbed-hook" in greeting
    assert postfix.wait_log(r"postfix/extra/smtpd\[\d+\]: (dis)?connect from", timeout=10)
    resolv = postfix.run(["cat", "/etc/resolv.conf"]).stdout
    assert "127.0.53.53" in resolv
    assert "127.0.53.53" not in HOST_RESOLV.read_text()
    assert postfix.postconf("-h", "smtpd_banner").strip() == "$myhostname ESMTP testbed-hook"
    mail_version = postfix.postconf("-dh", "mail_version").strip()
    assert mail_version == postfix.pv.full_version


# --- life cycle ---------------------------------------------------------------------------------------


def _bed_mounts() -> list[str]:
    """Mounts in the host's namespace that a Postfix namespace might have leaked."""
    marks = [str(v.root) for v in available_versions(["3.10", "3.11"]) if v.root] + ["resolv.conf"]
    return [
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if any(m in line for m in marks)
    ]


@pytest.mark.e2e
def test_bed_starts_and_stops_cleanly_ten_times(bed: Bed) -> None:
    if bed.origin != "pytest" or bed.other_users():
        pytest.skip("the bed is shared (started by `up`, or other test sessions use it): not restarting it")
    versions = available_versions()
    mounts_before = _bed_mounts()
    timings = []
    for i in range(10):
        bed.stop()
        assert listening_sockets() == [], f"cycle {i}: still listening after stop"
        t0 = time.monotonic()
        bed.start()
        pf = bed.postfix(versions[i % len(versions)])
        pf.reset()
        pf.start()
        assert pf.run(["postfix", "status"], check=False).returncode == 0
        timings.append(time.monotonic() - t0)
    bed.stop()
    leftover = listening_sockets()
    bed.start()
    assert leftover == [], "listening after the last stop"
    assert _bed_mounts() == mounts_before
    print(f"10 bed+Postfix cycles: {sum(timings):.1f}s, slowest {max(timings):.2f}s")


@pytest.mark.testbed
def test_stop_never_signals_a_recycled_pid() -> None:
    """A stale state file whose PID now belongs to another process must not get that process signalled."""
    me = os.getpid()
    stale = procs.Proc("stale", me, "no-such-marker", start_time=1)  # same PID, other start time
    assert not procs.alive(stale)
    procs.stop(stale)  # would kill this test process if it signalled
    assert procs.alive(procs.adopt("me", me, ""))


@pytest.mark.e2e
def test_host_resolv_conf_unchanged(bed: Bed, request: pytest.FixtureRequest) -> None:
    before = host_resolv_hash_at_start(request.config)
    assert hashlib.sha256(HOST_RESOLV.read_bytes()).hexdigest() == before
