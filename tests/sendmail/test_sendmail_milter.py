"""The milter under Debian's real Sendmail (8.17, ``sendmail-bin``), hooked up as contrib/sendmail/README.md says.

Sendmail conflicts with Postfix on the host, so it runs in a debootstrap chroot (bookworm, cached under
/var/cache/requiretls-testbed/bookworm-sendmail by scripts/build-testchroot.sh) that shares the host's
loopback: Sendmail listens on 127.0.0.1:PORT, the milter on the host at ``inet:MPORT@127.0.0.1``.  Debian's
own sendmail.mc gets the README's ``INPUT_MAIL_FILTER`` line; the test-only changes are the port and
``queueonly`` delivery, so that every accepted message stays in the queue and its headers can be read from
the qf file exactly as Sendmail would send them.

Skipped, with the reason, when the chroot cannot be built (no root, no debootstrap, no mirror).
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
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.sendmail

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("RTLS_TESTBED_CACHE", "/var/cache/requiretls-testbed"))
CHROOT = CACHE / "bookworm-sendmail"
FQDN = "mail.sendmail.test"
UNTRUSTED_CLIENT = "127.0.0.3"  # on loopback, but outside trusted_networks below


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process group this test started (by its id)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture(scope="session")
def sendmail_chroot() -> Path:
    if os.geteuid() != 0:
        pytest.skip("the Sendmail chroot needs root (debootstrap, chroot)")
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (scripts/install-apt.sh installs it)")
    r = subprocess.run(["sh", str(ROOT / "scripts/build-testchroot.sh"), "bookworm-sendmail"],
                       capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        pytest.skip(f"cannot build the Sendmail chroot: {(r.stderr or r.stdout).strip()[-500:]}")
    return CHROOT


def sendmail_mc(debian_mc: str, port: int, milter_port: int) -> str:
    """Debian's sendmail.mc plus the README's INPUT_MAIL_FILTER line.  Test-only: the port, queue-only delivery,
    no MSP port, no greet pause, and sender domains need not resolve (there is no DNS here)."""
    mc = debian_mc.replace("Port=smtp,", f"Port={port},")
    mc = "\n".join(line for line in mc.splitlines() if "Name=MSP-v4" not in line and "greet_pause" not in line)
    ours = (
        "define(`confDELIVERY_MODE', `queueonly')dnl\n"
        "FEATURE(`accept_unresolvable_domains')dnl\n"
        f"INPUT_MAIL_FILTER(`requiretls', `S=inet:{milter_port}@127.0.0.1, F=T, T=C:10s;S:30s;R:30s;E:5m')dnl\n"
    )
    assert "MAILER_DEFINITIONS" in mc
    return mc.replace("MAILER_DEFINITIONS", ours + "MAILER_DEFINITIONS", 1) + "\n"


@dataclass
class Rig:
    root: Path
    port: int
    milter_log: Path

    def send(self, message: bytes, rcpts: list[str], source: str = "127.0.0.1") -> str:
        """Send over SMTP; return the queue id from Sendmail's 250 reply."""
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=60,
                          source_address=(source, 0)) as s:
            s.ehlo()
            s.mail("alice@example.org")
            for r in rcpts:
                code, text = s.rcpt(r)
                assert code == 250, (r, code, text)
            code, text = s.data(message)
            assert code == 250, (code, text)
        m = re.search(rb"([0-9A-Za-z]{14}) Message accepted", text)
        assert m, text
        return m.group(1).decode()

    def queued_headers(self, qid: str) -> list[tuple[str, str]]:
        """The headers of a queued message, from its qf file (``H?flags?Name: value`` lines)."""
        qf = self.root / "var/spool/mqueue" / f"qf{qid}"
        headers: list[tuple[str, str]] = []
        for line in qf.read_text(errors="replace").splitlines():
            if line.startswith("H"):
                body = re.sub(r"^H(\?[^?]*\?)?", "", line)
                name, _, value = body.partition(":")
                headers.append((name, value.strip()))
            elif line.startswith(("\t", " ")) and headers:
                name, value = headers[-1]
                headers[-1] = (name, value + " " + line.strip())
        return headers

    def log(self) -> str:
        return self.milter_log.read_text(errors="replace")


@pytest.fixture(scope="module")
def rig(sendmail_chroot: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One Sendmail and one milter for the module: each test sends its own messages and reads them back by
    queue id."""
    tmp_path = tmp_path_factory.mktemp("sendmail")
    root = tmp_path / "chroot"
    subprocess.run(["cp", "-a", "--reflink=auto", str(sendmail_chroot), str(root)], check=True)
    port, milter_port = _free_port(), _free_port()

    # The milter on the host, as an admin would run it (policy: opt-out only from trusted clients).
    cfg = tmp_path / "requiretls.toml"
    cfg.write_text('[policy]\noptout_from = "trusted"\ntrusted_networks = ["127.0.0.1/32"]\n'
                   f'[milter]\nsocket = "inet:{milter_port}@127.0.0.1"\nmta = "sendmail"\n')
    milter_log = tmp_path / "milter.log"
    with open(milter_log, "wb") as out:
        milter = subprocess.Popen([sys.executable, "-m", "requiretls", "milter", "--config", str(cfg)],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    sendmail: subprocess.Popen[bytes] | None = None
    try:
        _wait_port(milter_port, milter, "the milter")
        mc = sendmail_mc((root / "etc/mail/sendmail.mc").read_text(), port, milter_port)
        (root / "etc/mail/sendmail.mc").write_text(mc)
        # Sendmail sleeps a minute when it cannot qualify the host name: give the host's name an FQDN here.
        hosts = (root / "etc/hosts").read_text()
        (root / "etc/hosts").write_text(f"127.0.0.1\t{FQDN} {socket.gethostname()}\n" + hosts)
        (root / "etc/mail/local-host-names").write_text(f"{FQDN}\nlocalhost\n")
        (root / "run/sendmail/mta").mkdir(parents=True, exist_ok=True)
        subprocess.run(["chroot", str(root), "sh", "-c", "m4 /etc/mail/sendmail.mc > /etc/mail/sendmail.cf"],
                       check=True, capture_output=True, timeout=60)
        cf = (root / "etc/mail/sendmail.cf").read_text()
        assert f"Xrequiretls, S=inet:{milter_port}@127.0.0.1, F=T" in cf
        sendmail_log = tmp_path / "sendmail.log"
        with open(sendmail_log, "wb") as out:
            # A private mount namespace for /proc and /dev; the mounts vanish with it.
            sendmail = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                 'mount -t proc proc "$1/proc"; mount --rbind /dev "$1/dev"; '
                 'exec chroot "$1" /usr/sbin/sendmail-mta -bD -C/etc/mail/sendmail.cf', "sendmail", str(root)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        _wait_port(port, sendmail, "sendmail")
        yield Rig(root, port, milter_log)
    finally:
        if sendmail is not None:
            _stop(sendmail)
        _stop(milter)


def test_milter_applies_optout_cookie_from_trusted_client_and_drops_forged_route(rig: Rig) -> None:
    message = (
        b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: [tls-optout] quarterly report\r\n"
        b"X-RequireTLS-Route: relay\r\nMessage-ID: <optout@example.org>\r\n\r\nbody\r\n"
    )
    qid = rig.send(message, ["bob@example.net", "root@localhost"])
    headers = rig.queued_headers(qid)
    names = [n.lower() for n, _ in headers]
    assert ("Subject", "quarterly report") in headers, headers  # the cookie is gone
    assert ("TLS-Required", "No") in headers, headers  # ... and became the RFC 8689 header
    assert ("X-RequireTLS-Route", "relay") not in headers, headers  # the forged private header is deleted
    assert names.count("tls-required") == 1
    log = rig.log()
    assert f"{qid}: requiretls: class=optout" in log, log
    assert "subject cookie [tls-optout] from trusted client" in log
    assert "removed 1 inbound X-RequireTLS-Route field(s)" in log
    assert "client=127.0.0.1" in log


def test_milter_ignores_optout_from_untrusted_client(rig: Rig) -> None:
    message = (
        b"From: mallory@example.org\r\nTo: root@localhost\r\nSubject: [tls-optout] hello\r\n"
        b"TLS-Required: No\r\nMessage-ID: <untrusted@example.org>\r\n\r\nbody\r\n"
    )
    qid = rig.send(message, ["root@localhost"], source=UNTRUSTED_CLIENT)
    headers = rig.queued_headers(qid)
    assert ("Subject", "[tls-optout] hello") in headers, headers  # not a cookie from this client
    log = rig.log()
    line = next(x for x in log.splitlines() if f"{qid}: requiretls:" in x)
    assert "class=default" in line, line
    assert f"client={UNTRUSTED_CLIENT}" in line
    assert "subject cookie ignored" in line
    assert "TLS-Required: No ignored: optout_from = trusted" in line


def test_milter_sees_each_message_with_its_sendmail_queue_id(rig: Rig) -> None:
    ids = [rig.send(f"Subject: n{i}\r\n\r\nbody\r\n".encode(), ["root@localhost"]) for i in range(3)]
    log = rig.log()
    for qid in ids:
        assert re.search(rf"^.*{qid}: requiretls: class=default, .*from=<alice@example.org>, nrcpt=1", log, re.M), log


def test_sendmail_refuses_the_requiretls_parameter_before_the_milter(rig: Rig) -> None:
    """RFC 8689 section 4.1 cannot be received on Sendmail: it refuses the unknown MAIL FROM parameter itself."""
    before = rig.log().count("requiretls: class=")
    with smtplib.SMTP("127.0.0.1", rig.port, local_hostname="client.test", timeout=60) as s:
        s.ehlo()
        assert not s.has_extn("requiretls")
        code, text = s.docmd("MAIL FROM:<alice@example.org> REQUIRETLS")
    assert code == 555, (code, text)
    assert b"parameter unrecognized" in text, text
    assert rig.log().count("requiretls: class=") == before


def test_requiretls_tagged_mail_is_refused_because_sendmail_cannot_enforce_it(rig: Rig) -> None:
    """Never weaker: a [requiretls] message would leave under Sendmail's own TLS policy, so it is refused."""
    message = b"From: alice@example.org\r\nSubject: contract [requiretls]\r\n\r\nbody\r\n"
    with smtplib.SMTP("127.0.0.1", rig.port, local_hostname="client.test", timeout=60) as s:
        s.ehlo()
        s.mail("alice@example.org")
        assert s.rcpt("root@localhost")[0] == 250
        code, text = s.data(message)
    assert (code, text.split()[0]) == (550, b"5.7.30"), text
    assert "class=requiretls" in rig.log() and "cannot be enforced by this MTA" in rig.log()


def test_private_headers_do_not_leave_a_sendmail_host(rig: Rig) -> None:
    message = b"From: alice@example.org\r\nSubject: [tls-optout] hi\r\n\r\nbody\r\n"
    qid = rig.send(message, ["bob@example.net"])
    names = {n.lower() for n, _ in rig.queued_headers(qid)}
    assert "x-requiretls-route" not in names
    assert "x-requiretls-handback" not in names
