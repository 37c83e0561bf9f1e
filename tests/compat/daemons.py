"""The real Debian daemons of the compatibility site, each a private instance on loopback ports the test
chooses, with its config and state under the testbed state dir (never the system's /etc/amavis,
/etc/opendkim.conf or /etc/dovecot, never a system port):

* amavisd-new (``amavisd``): a content filter with a do-nothing policy (no virus scanner, no SpamAssassin);
  it takes mail on one port and forwards it to Postfix's return port, adding ``X-Virus-Scanned``.
* opendkim: a signing milter for ``sender.test`` on an inet socket.
* Dovecot (``dovecot-lmtpd``): LMTP on an inet socket, Maildir mailboxes.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not listening after {timeout}s:\n{_tail(log)}")


def _port_free(port: int) -> None:
    """Refuse to start on a port something already listens on: a leftover daemon would answer in our place."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
    except OSError:
        return
    raise RuntimeError(f"127.0.0.1:{port} is already in use (a leftover daemon?)")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
    except ProcessLookupError:
        return
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(5)


def package_version(name: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True)
    return r.stdout.strip() or "not installed"


def _fresh_dir(path: Path, owner: str | None = None, mode: int = 0o755) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    path.chmod(mode)
    if owner:
        pw = pwd.getpwnam(owner)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


@dataclass
class Amavis:
    """amavisd-new as a content filter: listens on ``port``, forwards to ``forward_port`` (Postfix's return
    smtpd).  Do-nothing policy: virus and spam checks bypassed, everything passed; the header
    ``X-Virus-Scanned: <mark>`` marks what went through it."""

    dir: Path
    port: int
    forward_port: int
    mark: str = "amavisd-new at compat.test"
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        _port_free(self.port)
        d = _fresh_dir(self.dir, "amavis", 0o750)
        for sub in ("tmp", "db", "var"):
            _fresh_dir(d / sub, "amavis", 0o750)
        # amavis refuses a config file in a directory its user can write
        conf = _fresh_dir(self.dir.with_name(self.dir.name + "-conf")) / "amavisd.conf"
        conf.write_text(
            f"""use strict;
$MYHOME = '{d}';
$TEMPBASE = '{d}/tmp';
$db_home = '{d}/db';
$pid_file = '{d}/var/amavisd.pid';
$lock_file = '{d}/var/amavisd.lock';
$daemon_user = 'amavis';
$daemon_group = 'amavis';
$mydomain = 'compat.test';
$myhostname = 'amavis.compat.test';
$max_servers = 2;
$child_timeout = 60;
$inet_socket_bind = '127.0.0.1';
$inet_socket_port = [{self.port}];
@inet_acl = qw(127.0.0.1);
$forward_method = 'smtp:[127.0.0.1]:{self.forward_port}';
$notify_method = $forward_method;
@bypass_virus_checks_maps = (1);
@bypass_spam_checks_maps = (1);
@bypass_banned_checks_maps = (1);
@bypass_header_checks_maps = (1);
$enable_dkim_verification = 0;
$enable_dkim_signing = 0;
@av_scanners = ();
@av_scanners_backup = ();
$final_virus_destiny = D_PASS;
$final_banned_destiny = D_PASS;
$final_spam_destiny = D_PASS;
$final_bad_header_destiny = D_PASS;
$X_HEADER_LINE = '{self.mark}';
$do_syslog = 0;
$LOGFILE = '{d}/amavis.log';
$log_level = 2;
$enable_db = 0;
$enable_zmq = 0;
$nanny_details_level = 0;
$sa_spam_subject_tag = undef;
1;
"""
        )
        log = d / "console.log"
        logf = open(log, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen(
            ["/usr/sbin/amavisd", "-c", str(conf), "foreground"],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, cwd=d,
        )
        try:
            _wait_port(self.port, self.proc, d / "amavis.log", timeout=60)
        except RuntimeError as e:
            raise RuntimeError(f"amavisd-new did not start: {e}\n{_tail(log)}") from e

    def log(self) -> str:
        p = self.dir / "amavis.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


@dataclass
class OpenDkim:
    """opendkim signing mail from ``domain`` (selector ``selector``) on inet ``127.0.0.1:port``."""

    dir: Path
    port: int
    domain: str = "sender.test"
    selector: str = "compat"
    proc: subprocess.Popen[bytes] | None = None
    public_txt: str = ""

    def start(self) -> None:
        _port_free(self.port)
        d = _fresh_dir(self.dir, "opendkim", 0o750)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        keyfile = d / "private.key"
        keyfile.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption())
        )
        pw = pwd.getpwnam("opendkim")
        os.chown(keyfile, pw.pw_uid, pw.pw_gid)
        keyfile.chmod(0o600)
        pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        import base64

        self.public_txt = "v=DKIM1; k=rsa; p=" + base64.b64encode(pub).decode()
        conf = d / "opendkim.conf"
        conf.write_text(
            f"""Syslog no
LogWhy yes
UMask 007
Mode s
Domain {self.domain}
Selector {self.selector}
KeyFile {keyfile}
Socket inet:{self.port}@127.0.0.1
PidFile {d}/opendkim.pid
UserID opendkim:opendkim
Canonicalization relaxed/simple
InternalHosts 127.0.0.0/8
OversignHeaders From
"""
        )
        log = d / "console.log"
        logf = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["/usr/sbin/opendkim", "-f", "-v", "-x", str(conf)],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, cwd=d,
        )
        try:
            _wait_port(self.port, self.proc, log, timeout=20)
        except RuntimeError as e:
            raise RuntimeError(f"opendkim did not start: {e}") from e

    def dnsfunc(self, name: bytes | str, timeout: int = 5) -> bytes:
        """For dkimpy's verifier: the TXT record of our selector, nothing else."""
        n = name.decode() if isinstance(name, bytes) else name
        if n.rstrip(".") == f"{self.selector}._domainkey.{self.domain}":
            return self.public_txt.encode()
        return b""

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


@dataclass
class Dovecot:
    """Dovecot with only LMTP, on inet ``127.0.0.1:port``; every user has a Maildir under ``dir/mail``."""

    dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    users: list[str] = field(default_factory=list)

    def start(self) -> None:
        _port_free(self.port)
        d = _fresh_dir(self.dir)
        _fresh_dir(d / "run")
        mail = _fresh_dir(d / "mail", "nobody", 0o755)
        conf = d / "dovecot.conf"
        conf.write_text(
            f"""protocols = lmtp
listen = 127.0.0.1
base_dir = {d}/run
state_dir = {d}/run/state
instance_name = compat-{self.port}
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
ssl = no
disable_plaintext_auth = no
mail_location = maildir:{mail}/%n/Maildir
first_valid_uid = 1
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={mail}/%n
}}
passdb {{
  driver = static
  args = nopassword=y
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
  unix_listener lmtp {{
    mode = 0600
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  chroot =
}}
lmtp_save_to_detail_mailbox = no
"""
        )
        log = d / "console.log"
        logf = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["/usr/sbin/dovecot", "-F", "-c", str(conf)],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, cwd=d,
        )
        try:
            _wait_port(self.port, self.proc, d / "dovecot.log", timeout=20)
        except RuntimeError as e:
            raise RuntimeError(f"dovecot did not start: {e}\n{_tail(log)}") from e

    def mailbox(self, user: str) -> list[bytes]:
        """The messages in ``user``'s Maildir (new/ and cur/)."""
        base = self.dir / "mail" / user / "Maildir"
        out = []
        for sub in ("new", "cur"):
            p = base / sub
            if p.exists():
                out += [f.read_bytes() for f in sorted(p.iterdir())]
        return out

    def log(self) -> str:
        p = self.dir / "dovecot.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


@dataclass
class MtaStsResolver:
    """postfix-mta-sts-resolver (``mta-sts-daemon``, PyPI) as the admin's ``smtp_tls_policy_maps`` socketmap on
    ``127.0.0.1:port``.  It resolves with the system resolver, so it runs in a private mount namespace with the
    bed's resolv.conf bound over /etc/resolv.conf (as the bed's Postfix does), and trusts the bed's CA
    (``SSL_CERT_FILE``).  ``strict_testing``: policies in mode ``testing`` are enforced too (the admin's choice,
    and what tells its answers apart from ours, which leave ``testing`` alone)."""

    dir: Path
    port: int
    resolv_conf: Path
    cafile: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        _port_free(self.port)
        d = _fresh_dir(self.dir)
        conf = d / "mta-sts-daemon.yml"
        conf.write_text(
            f"""host: 127.0.0.1
port: {self.port}
reuse_port: true
shutdown_timeout: 2
cache:
  type: internal
  options:
    cache_size: 100
default_zone:
  strict_testing: true
  timeout: 5
"""
        )
        exe = Path(sys.executable).parent / "mta-sts-daemon"
        script = (f"set -e; mount --make-rprivate /; mount --bind {self.resolv_conf} /etc/resolv.conf; "
                  f"exec {exe} -c {conf} -v debug")
        log = d / "console.log"
        logf = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--", "sh", "-c", script],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, cwd=d,
            env={**os.environ, "SSL_CERT_FILE": str(self.cafile)},
        )
        try:
            _wait_port(self.port, self.proc, log, timeout=20)
        except RuntimeError as e:
            raise RuntimeError(f"mta-sts-daemon did not start: {e}") from e

    def query(self, domain: str, zone: str = "postfix") -> str:
        """One socketmap lookup, as Postfix makes it."""
        req = f"{zone} {domain}".encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(str(len(req)).encode() + b":" + req + b",")
            data = b""
            while not data.endswith(b","):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return data.partition(b":")[2][:-1].decode()

    def log(self) -> str:
        p = self.dir / "console.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
