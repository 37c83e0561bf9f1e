"""The Debian package, built as ``make deb`` builds it and installed into a clean Debian 12 chroot.

The base chroot (bookworm minbase with Postfix, systemd and man-db; the package's dependencies downloaded into
its apt cache, not installed) is cached under /var/cache/requiretls-testbed/bookworm-base by
scripts/build-testchroot.sh; each test session installs the .deb into a fresh copy of it.  Everything after
the install runs from the installed files only (``/usr/bin/requiretls``, ``/usr/lib/python3/dist-packages``).

Cost: about 30 s with the chroot cached (build 5 s, lintian 3 s, copy and install 10 s, the rest 12 s); the
first run also builds the chroot (50-80 s) and installs the build dependencies with apt.  ``RTLS_DEB_TESTS=0`` skips
them.  Skipped with the reason when not root or when the chroot cannot be built.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.packaging.chroots import CONFIG, ENV, SOCKDIR, Chroot, Deb, copy_chroot, dpkg_status, stop_group
from tests.packaging.chroots import tail as _tail
from tests.unit.test_front import FakeSmtpd, fake_smtpd_thread
from tests.unit.tlsutil import client_context, pki

pytestmark = pytest.mark.deb

UNITS = ("requiretls-milter", "requiretls-policyd", "requiretls-relay")


@pytest.fixture(scope="module")
def chroot(deb: Deb, tmp_path_factory: pytest.TempPathFactory) -> Chroot:
    root = copy_chroot("bookworm-base", tmp_path_factory.mktemp("deb") / "bookworm")
    shutil.copy(deb.path, root / "tmp" / deb.path.name)
    c = Chroot(root)
    (root / "tmp/postfix-before").write_bytes(
        (root / "etc/postfix/main.cf").read_bytes() + (root / "etc/postfix/master.cf").read_bytes())
    r = c.run("apt-get", "install", "-y", "-q", f"/tmp/{deb.path.name}", timeout=600)
    assert r.returncode == 0, _tail(r)
    return c


def test_lintian_reports_no_errors(deb: Deb) -> None:
    errors = [line for line in deb.lintian.splitlines() if line.startswith("E:")]
    assert not errors, deb.lintian


def test_package_depends_only_on_debian_packages(deb: Deb, chroot: Chroot) -> None:
    fields = subprocess.run(["dpkg-deb", "-f", str(deb.path), "Depends"], capture_output=True, text=True,
                            check=True).stdout
    for dep in ("python3-milter", "python3-dnspython", "python3-cryptography", "python3-aiosmtpd",
                "python3-prometheus-client"):
        assert dep in fields, fields
    # The chroot's only apt source is the Debian archive, and the code runs on Debian's modules, not a venv.
    r = chroot.run("python3", "-c", "import Milter, dns, aiosmtpd, prometheus_client, requiretls; "
                   "print(requiretls.__file__, Milter.__file__, aiosmtpd.__file__)")
    assert r.returncode == 0, _tail(r)
    assert all(p.startswith("/usr/lib/python3/dist-packages/") for p in r.stdout.split()), r.stdout


def test_version_explain_and_check_run_from_the_installed_files(chroot: Chroot) -> None:
    r = chroot.run("requiretls", "--version")
    assert r.returncode == 0 and re.fullmatch(r"requiretls \d+\.\d+\.\d+\n", r.stdout), _tail(r)
    r = chroot.run("requiretls", "explain", "--config", CONFIG, "--sender", "alice@example.org", "--rcpt",
                   "bob@example.net", "--client-ip", "127.0.0.1",
                   stdin="From: alice@example.org\nSubject: [tls-optout] hello\n\nbody\n")
    assert r.returncode == 0, _tail(r)
    assert "class:       optout" in r.stdout and "add     TLS-Required: No" in r.stdout, r.stdout
    # No DNS in the chroot: the lookup fails, and says so with exit 2, without a traceback.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))  # a resolver that never answers
        port = s.getsockname()[1]
        r = chroot.run("requiretls", "check", "example.net", "--resolver", f"127.0.0.1:{port}", "--timeout", "1")
    assert r.returncode == 2, _tail(r)
    assert "Traceback" not in r.stderr + r.stdout, _tail(r)
    assert "REQUIRETLS delivery possible: no — lookup error, try later" in r.stdout, _tail(r)


def test_postfix_config_reads_the_chroot_postfix_and_install_changed_nothing(chroot: Chroot) -> None:
    before = (chroot.root / "tmp/postfix-before").read_bytes()
    after = (chroot.root / "etc/postfix/main.cf").read_bytes() + (chroot.root / "etc/postfix/master.cf").read_bytes()
    assert after == before, "installing the package changed main.cf or master.cf"
    r = chroot.run("requiretls", "postfix-config", "--config", CONFIG)
    assert r.returncode == 0, _tail(r)
    assert "smtpd_milters" in r.stdout and "requiretls/milter.sock" in r.stdout, r.stdout
    version = chroot.run("postconf", "-h", "mail_version").stdout.strip()
    assert version.startswith("3.7."), version


def test_config_tables_user_and_directories(chroot: Chroot) -> None:
    r = chroot.run("dpkg-query", "-W", "-f=${Conffiles}", "requiretls")
    for f in (CONFIG, "/etc/requiretls/policy", "/etc/requiretls/senders"):
        assert f in r.stdout, r.stdout
    cfg = (chroot.root / CONFIG.lstrip("/")).read_text()
    assert 'table = "policy"' in cfg.splitlines() and 'sender_table = "senders"' in cfg.splitlines()
    r = chroot.run("getent", "passwd", "_requiretls")
    _, _, uid, _, _, home, shell = r.stdout.strip().split(":")
    assert int(uid) < 1000 and home == "/var/lib/requiretls" and shell == "/usr/sbin/nologin", r.stdout
    r = chroot.run("stat", "-c", "%U %G %a", SOCKDIR, "/var/lib/requiretls")
    assert r.stdout.split("\n")[:2] == ["_requiretls postfix 2750", "_requiretls _requiretls 750"], r.stdout
    # Least privilege: the daemons' user is in no group of Postfix's.
    assert chroot.run("id", "-Gn", "_requiretls").stdout.split() == ["_requiretls"]


def test_units_pass_systemd_analyze_verify_and_are_hardened(chroot: Chroot) -> None:
    paths = [f"/lib/systemd/system/{u}.service" for u in UNITS]
    r = chroot.run("systemd-analyze", "verify", *paths)
    assert r.returncode == 0 and not r.stderr.strip(), _tail(r)
    for path in paths:
        r = chroot.run("systemd-analyze", "security", "--offline=true", "--no-pager", path)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
        assert m, _tail(r)
        assert float(m.group(1)) <= 2.0, r.stdout  # "OK" is below 4.0; Debian's hardened mail daemons are 2-4
    r = chroot.run("systemctl", "is-enabled", *UNITS)
    assert r.stdout.split() == ["enabled"] * 3, _tail(r)


@pytest.fixture
def daemons(chroot: Chroot) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """The three daemons started from the installed files as the units start them: as _requiretls, after
    the socket-dir helper, with NOTIFY_SOCKET pointing at a datagram socket of ours."""
    r = chroot.run("/usr/libexec/requiretls/socket-dir")
    assert r.returncode == 0, _tail(r)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in ("milter", "policyd", "relay"):
            log = open(chroot.root / f"tmp/{name}.log", "wb")  # noqa: SIM115 - closed with the process
            procs[name] = subprocess.Popen(
                chroot.command(["requiretls", name, "--config", CONFIG], user="_requiretls"),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=ENV | {"NOTIFY_SOCKET": f"/run/notify-{name}.sock"},
            )
            log.close()
        yield procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


@pytest.fixture
def notify(chroot: Chroot) -> Iterator[dict[str, socket.socket]]:
    socks = {}
    for name in ("policyd", "relay"):
        path = chroot.root / f"run/notify-{name}.sock"
        path.unlink(missing_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(path))
        os.chmod(path, 0o666)
        s.settimeout(30)
        socks[name] = s
    yield socks
    for s in socks.values():
        s.close()


def test_daemons_run_as_their_user_and_only_postfix_reaches_the_sockets(
        chroot: Chroot, notify: dict[str, socket.socket], daemons: dict[str, subprocess.Popen[bytes]]) -> None:
    # policyd and relay tell systemd they are ready (Type=notify) once they listen.
    for name, s in notify.items():
        assert s.recv(100) == b"READY=1", name
    sockdir = chroot.root / SOCKDIR.lstrip("/")
    end = time.monotonic() + 30
    while not (sockdir / "milter.sock").exists() and time.monotonic() < end:
        assert daemons["milter"].poll() is None, (chroot.root / "tmp/milter.log").read_text()
        time.sleep(0.1)
    r = chroot.run("stat", "-c", "%n %U %G", *(f"{SOCKDIR}/{n}.sock" for n in ("milter", "policyd", "relay")))
    assert r.returncode == 0, _tail(r)
    for line in r.stdout.splitlines():
        assert line.endswith(" _requiretls postfix"), r.stdout
    probe = (
        "import socket, sys\n"
        "for n in ('milter', 'policyd', 'relay'):\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    try:\n"
        f"        s.connect('{SOCKDIR}/' + n + '.sock'); print(n, 'connected')\n"
        "    except OSError as e:\n"
        "        print(n, 'refused', e.errno)\n"
    )
    as_postfix = chroot.run("python3", "-c", probe, user="postfix")
    assert as_postfix.stdout.split("\n")[:3] == ["milter connected", "policyd connected", "relay connected"], \
        _tail(as_postfix)
    as_nobody = chroot.run("python3", "-c", probe, user="nobody")
    assert all(line.startswith(("milter refused", "policyd refused", "relay refused"))
               for line in as_nobody.stdout.splitlines()), _tail(as_nobody)
    # policyd answers a socketmap query (no DNS here: TEMP, which makes Postfix defer).
    query = (
        "import socket\n"
        f"s = socket.socket(socket.AF_UNIX); s.connect('{SOCKDIR}/policyd.sock'); s.settimeout(60)\n"
        "q = b'default example.com'; s.sendall(b'%d:%s,' % (len(q), q)); print(s.recv(1000).decode())\n"
    )
    r = chroot.run("python3", "-c", query, user="postfix")
    assert re.fullmatch(r"\d+:TEMP .*,\n", r.stdout), _tail(r)
    for p in daemons.values():
        assert p.poll() is None


def test_sighup_reloads_the_installed_daemons_on_debian_python3_milter(
        chroot: Chroot, notify: dict[str, socket.socket], daemons: dict[str, subprocess.Popen[bytes]]) -> None:
    """``systemctl reload`` is ``kill -HUP``: each daemon re-reads the table and keeps running, the milter too,
    on Debian 12's own python3-milter and libmilter (where SIGHUP, left to libmilter, would stop it)."""
    for name, s in notify.items():
        assert s.recv(100) == b"READY=1", name
    sock = chroot.root / SOCKDIR.lstrip("/") / "milter.sock"
    end = time.monotonic() + 30
    while not sock.exists() and time.monotonic() < end:
        assert daemons["milter"].poll() is None, (chroot.root / "tmp/milter.log").read_text()
        time.sleep(0.1)
    table = chroot.root / "etc/requiretls/policy"
    before = table.read_text()
    try:
        table.write_text(before + "\nreload.example requiretls=yes\n")
        for p in daemons.values():
            os.kill(p.pid, signal.SIGHUP)
        for name, s in notify.items():  # systemd hears the reload begin and end
            assert s.recv(100).startswith(b"RELOADING=1\nMONOTONIC_USEC="), name
            assert s.recv(100) == b"READY=1", name
        end = time.monotonic() + 30
        logs = {}
        while time.monotonic() < end:
            logs = {n: (chroot.root / f"tmp/{n}.log").read_text() for n in daemons}
            if all("reload=done" in text for text in logs.values()):
                break
            time.sleep(0.1)
        for name, text in logs.items():
            assert "reload=done, table_entries=" in text and "reload=\"failed" not in text, f"{name}:\n{text}"
        time.sleep(2)  # libmilter stops a second or so after it takes a SIGHUP itself: give it the time
        for name, p in daemons.items():
            assert p.poll() is None, f"{name} ended:\n{(chroot.root / f'tmp/{name}.log').read_text()}"
        probe = f"import socket; socket.socket(socket.AF_UNIX).connect('{SOCKDIR}/milter.sock')"
        r = chroot.run("python3", "-c", probe, user="postfix")
        assert r.returncode == 0, _tail(r)
    finally:
        table.write_text(before)


def test_the_installed_front_relays_requiretls_on_debian_python3_uvloop(chroot: Chroot, tmp_path: Path) -> None:
    """``requiretls front`` from the installed files, as its unit runs it (as _requiretls), on Debian 12's
    python3 and python3-uvloop (which the package recommends; the workers run its loop): STARTTLS with the
    key it is given, ``MAIL FROM ... REQUIRETLS`` taken out and the carrier field put at the top of the
    message smtpd receives, REQUIRETLS in clear refused with 555.  smtpd is a recording stand-in on a unix
    socket (as ``unix:public/requiretls-front``, less Postfix)."""
    assert dpkg_status(chroot, "python3-uvloop") == "install ok installed"
    files = pki().files("postfix")
    for f, name in ((files.key, "front.key"), (files.cert, "front.pem")):
        shutil.copy(f, chroot.root / "tmp" / name)
        os.chmod(chroot.root / "tmp" / name, 0o644)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (chroot.root / "tmp/front.toml").write_text(
        f'[front]\nlisten = ["127.0.0.1:{port}"]\nbackend = "unix:/tmp/smtpd.sock"\nworkers = 1\n'
        'tls_files = ["/tmp/front.key", "/tmp/front.pem"]\npostfix_config_dir = "/etc/postfix"\n')
    log = chroot.root / "tmp/front.log"
    with fake_smtpd_thread(chroot.root / "tmp/smtpd.sock") as fake, open(log, "wb") as out:
        proc = subprocess.Popen(chroot.command(["requiretls", "front", "--config", "/tmp/front.toml"],
                                               user="_requiretls"),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=ENV)
        try:
            _front_dialogue(proc, log, port, fake)
        finally:
            stop_group(proc)


def _front_dialogue(proc: subprocess.Popen[bytes], log: Path, port: int, fake: FakeSmtpd) -> None:
    """The installed front's dialogue for the test above: 555 in clear, REQUIRETLS over TLS."""
    end = time.monotonic() + 30
    while "front=listening" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < end, log.read_text()
        time.sleep(0.1)
    assert "loop=uvloop" in log.read_text(), log.read_text()
    with smtplib.SMTP("127.0.0.1", port, timeout=30, local_hostname="client.test") as c:
        assert "requiretls" not in c.ehlo()[1].decode().lower()
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            c.sendmail("a@b.test", ["c@d.test"], b"Subject: clear\r\n\r\nx\r\n", mail_options=["REQUIRETLS"])
        assert refused.value.smtp_code == 555
        c.rset()
        c.starttls(context=client_context())
        assert "REQUIRETLS" in c.ehlo()[1].decode().upper()
        c.sendmail("a@b.test", ["c@d.test"], b"Subject: tls\r\n\r\nbody\r\n", mail_options=["REQUIRETLS"])
    assert len(fake.messages) == 1, fake.commands
    assert fake.messages[0].startswith(b"Received: from client.test ([127.0.0.1]) by ")
    assert b"\r\nRequire-TLS-ESMTP: yes\r\nSubject: tls\r\n" in fake.messages[0]
    assert not any(b"REQUIRETLS" in c.upper() for c in fake.commands), fake.commands
    assert proc.poll() is None, log.read_text()


def _postfix_files(chroot: Chroot) -> bytes:
    return (chroot.root / "etc/postfix/main.cf").read_bytes() + (chroot.root / "etc/postfix/master.cf").read_bytes()


def test_remove_takes_requiretls_out_of_postfix_and_keeps_the_admins_edits(chroot: Chroot, deb: Deb) -> None:
    """Removing the package must not leave main.cf listing a milter that is gone (default_action=tempfail:
    every message deferred).  prerm runs the undo by the journal; an edit the admin made after --apply stays."""
    before = (chroot.root / "tmp/postfix-before").read_bytes()
    r = chroot.run("requiretls", "postfix-config", "--apply")  # no --config: /etc/requiretls/requiretls.toml
    assert r.returncode == 0, _tail(r)
    assert "requiretls/milter.sock" in chroot.run("postconf", "-h", "smtpd_milters").stdout
    assert (chroot.root / "etc/postfix/requiretls.journal").exists()
    assert chroot.run("postconf", "-e", "delay_warning_time = 3h").returncode == 0
    r = chroot.run("apt-get", "remove", "-y", "-q", "requiretls", timeout=300)
    assert r.returncode == 0, _tail(r)
    assert "main.cf: removed smtpd_milters" in r.stdout, _tail(r)
    assert chroot.run("postconf", "-h", "smtpd_milters").stdout.strip() == ""
    assert chroot.run("postconf", "-h", "delay_warning_time").stdout.strip() == "3h"
    assert not [p.name for p in (chroot.root / "etc/postfix").iterdir() if "requiretls" in p.name]
    assert chroot.run("postconf", "-X", "delay_warning_time").returncode == 0
    assert _postfix_files(chroot) == before
    # Installed again and applied again, for the purge below.
    r = chroot.run("apt-get", "install", "-y", "-q", f"/tmp/{deb.path.name}", timeout=600)
    assert r.returncode == 0, _tail(r)
    assert _postfix_files(chroot) == before, "installing the package changed main.cf or master.cf"
    assert chroot.run("requiretls", "postfix-config", "--apply").returncode == 0


def test_purge_removes_state_and_keeps_the_user(chroot: Chroot) -> None:
    r = chroot.run("apt-get", "purge", "-y", "-q", "requiretls", timeout=300)
    assert r.returncode == 0, _tail(r)
    # purge after an --apply: the wiring went with the package (prerm), main.cf and master.cf are as before
    assert _postfix_files(chroot) == (chroot.root / "tmp/postfix-before").read_bytes()
    assert not (chroot.root / "var/lib/requiretls").exists()
    assert not (chroot.root / SOCKDIR.lstrip("/")).exists()
    assert not (chroot.root / "etc/requiretls").exists()
    assert chroot.run("getent", "passwd", "_requiretls").returncode == 0
