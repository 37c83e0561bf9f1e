"""A real Postfix instance on the bed: Debian 12's 3.7 on the host, 3.10/3.11 in debootstrap chroots.

Each instance has its own config, queue and data directories under the bed's state dir and listens only on
127.0.0.1 ports of its own.  It runs as PID 1 of a private PID + mount namespace (``unshare``):

* the test ``resolv.conf`` (pointing at the bed's Unbound) is bind-mounted over ``/etc/resolv.conf`` inside
  that namespace only, so the host's file is never touched;
* for a chroot, ``/proc``, ``/dev`` and the bed's state dir are mounted into it at the same paths as on the
  host, so config paths, socket paths and log paths are identical inside and outside;
* killing the master ends the namespace: nothing is left behind, not even mounts.

Because the master is PID 1 in its namespace, its pid file says ``1``: any ``postfix`` command (stop,
reload, flush) must run inside that PID namespace, never on the host, or it would signal the host's init.
:meth:`Postfix.run` takes care of that.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import smtplib
import ssl
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

from . import procs
from .pki import POSTFIX_HOSTNAME

CHROOT_CACHE = Path(os.environ.get("RTLS_TESTBED_CACHE", "/var/cache/requiretls-testbed"))
CHROOT_SUITES = {"3.10": "trixie", "3.11": "sid"}
PORT_BASE = {"3.7": 20000, "3.10": 20100, "3.11": 20200}
"""Below Linux's ephemeral range (32768-60999), so a test server bound to port 0 never takes them."""
VERSIONS_ENV = "RTLS_POSTFIX_VERSIONS"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class PostfixVersion:
    """One Postfix build the bed can run: ``root`` is the chroot, or None for the host's own Postfix."""

    version: str  # major.minor, e.g. "3.10"
    full_version: str  # e.g. "3.10.13"
    root: Path | None

    @property
    def port_base(self) -> int:
        return PORT_BASE[self.version]


def _host_version() -> PostfixVersion | None:
    try:
        out = subprocess.run(
            ["/usr/sbin/postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        return None
    if not out:
        return None
    return PostfixVersion(".".join(out.split(".")[:2]), out, None)


def available_versions(wanted: Iterable[str] | None = None) -> list[PostfixVersion]:
    """The Postfix versions present (host + finished chroots), restricted by ``RTLS_POSTFIX_VERSIONS``."""
    found: list[PostfixVersion] = []
    host = _host_version()
    if host is not None:
        found.append(host)
    for _ver, suite in CHROOT_SUITES.items():
        stamp = CHROOT_CACHE / suite / ".rtls-ready"
        if stamp.exists():
            full = stamp.read_text().strip()
            found.append(PostfixVersion(".".join(full.split(".")[:2]), full, CHROOT_CACHE / suite))
    if wanted is None:
        env = os.environ.get(VERSIONS_ENV, "").replace(",", " ").split()
        wanted = env or None
    if wanted is not None:
        w = set(wanted)
        found = [v for v in found if v.version in w]
    return found


def version(name: str) -> PostfixVersion:
    for v in available_versions([name]):
        return v
    raise LookupError(f"Postfix {name} is not available (chroot not built? run scripts/build-chroots.sh)")


@dataclass(frozen=True)
class Ports:
    """127.0.0.1 ports of one instance.  ``extra`` are free for tests (re-injection listeners etc.)."""

    smtp: int
    submission: int
    extra: tuple[int, ...]


@dataclass(frozen=True)
class Submitted:
    queue_id: str
    reply: str


@dataclass(frozen=True)
class LogMatch:
    line: str
    match: re.Match[str]
    offset: int  # log offset just after the matching line


MASTER_CF = """\
# Written by the requiretls testbed; every service runs without chroot (chroot = n).
{smtp_addr} inet n - n - - smtpd
{sub_addr} inet n - n - - smtpd
  -o syslog_name=postfix/submission
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
  -o syslog_name=postfix/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class Postfix:
    """One Postfix instance.  Configure (``postconf``, ``add_service``, ``run_host``), then ``start``.

    ``config_dir`` is the same path inside the instance's root as on the host, so project tools that write
    Postfix configuration (``requiretls postfix-config -c DIR``) can be pointed at it directly.
    """

    state: Path  # the bed's state dir
    pv: PostfixVersion
    base_settings: dict[str, str] = field(default_factory=dict)
    slot: int = 0  # 0: `up`/demo; 1-9: one per concurrent test session (own dirs and ports)

    def __post_init__(self) -> None:
        self.dir = self.state / (f"postfix-{self.pv.version}" + (f"-s{self.slot}" if self.slot else ""))
        self.config_dir = self.dir / "etc"
        self.queue_dir = self.dir / "spool"
        self.data_dir = self.dir / "data"
        self.maillog = self.dir / "maillog"
        self.console_log = self.dir / "console.log"
        b = self.pv.port_base + 1000 * self.slot
        self.ports = Ports(smtp=b + 25, submission=b + 87, extra=tuple(range(b + 30, b + 40)))
        self._proc: procs.Proc | None = None

    # --- configuration ------------------------------------------------------------------------------

    @property
    def version(self) -> str:
        return self.pv.version

    def default_settings(self) -> dict[str, str]:
        pki = self.state / "pki"
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": POSTFIX_HOSTNAME,
            "mydomain": "local.test",
            "myorigin": "$myhostname",
            "mydestination": "$myhostname, localhost",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "mail_spool_directory": str(self.dir / "mail"),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.dir}",
            "biff": "no",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
            "smtputf8_enable": "yes",
            "smtp_dns_support_level": "dnssec",
            "smtp_tls_security_level": "dane",
            "smtp_tls_CAfile": str(pki / "ca.pem"),
            "smtp_tls_loglevel": "1",
            "smtp_address_preference": "ipv4",
            "smtp_connect_timeout": "5s",
            "smtpd_tls_cert_file": str(pki / "postfix.pem"),
            "smtpd_tls_key_file": str(pki / "postfix.key"),
            "smtpd_tls_security_level": "may",
            "smtpd_tls_loglevel": "1",
            "queue_run_delay": "10s",
            "minimal_backoff_time": "10s",
            "maximal_backoff_time": "30s",
            "delay_warning_time": "0h",
        }

    def reset(self) -> None:
        """Fresh config, empty queue and log: the instance as a test gets it.  Must not be running.

        The first start of an empty instance spends ~2.5 s in post-install creating the queue; so the first
        reset of a version starts and stops it once and keeps the empty queue and data directories as a
        template, which later resets copy (ownerships included), bringing a start down to ~0.3 s.
        """
        if self.running:
            raise RuntimeError("reset() on a running Postfix")
        self._wipe()
        tmpl = self._template_dir()
        if (tmpl / "done").exists():
            for sub in ("spool", "data"):
                subprocess.run(["cp", "-a", str(tmpl / sub), str(self.dir / sub)], check=True, timeout=60)
        else:
            self.start()
            self.stop()
            # Built aside and renamed into place: concurrent sessions may race to make the same template.
            tmp = tmpl.with_name(f"{tmpl.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for sub in ("spool", "data"):
                subprocess.run(["cp", "-a", str(self.dir / sub), str(tmp / sub)], check=True, timeout=60)
            for leftover in ("spool/pid/master.pid", "data/master.lock"):
                (tmp / leftover).unlink(missing_ok=True)
            (tmp / "done").touch()
            shutil.rmtree(tmpl, ignore_errors=True)
            try:
                tmp.rename(tmpl)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
            self._wipe()
            self.reset()

    def _template_dir(self) -> Path:
        stamp = (self.pv.root / ".rtls-ready") if self.pv.root else Path("/usr/sbin/postfix")
        key = f"{self.pv.full_version}-{stamp.stat().st_mtime_ns}"
        return self.state / ".postfix-templates" / self.version / key

    def _wipe(self) -> None:
        for sub in ("etc", "spool", "data", "mail"):
            p = self.dir / sub
            if p.exists():
                subprocess.run(["rm", "-rf", "--one-file-system", str(p)], check=True, timeout=60)
        self.config_dir.mkdir(parents=True)
        self.queue_dir.mkdir()  # postfix(1) chdirs here before post-install creates the rest
        (self.dir / "mail").mkdir(mode=0o1777)
        os.chmod(self.dir / "mail", 0o1777)
        for f in (self.maillog, self.console_log):
            f.unlink(missing_ok=True)
        settings = {**self.default_settings(), **self.base_settings}
        (self.config_dir / "main.cf").write_text(
            "# Written by the requiretls testbed.\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
        )
        (self.config_dir / "master.cf").write_text(
            MASTER_CF.format(
                smtp_addr=f"127.0.0.1:{self.ports.smtp}".ljust(9),
                sub_addr=f"127.0.0.1:{self.ports.submission}".ljust(9),
            )
        )
        self.settle_config()

    def postconf(self, *args: str) -> str:
        """Run this version's ``postconf -c CONFIG_DIR ARGS`` (e.g. ``"-e", "k = v"``); return stdout."""
        out = self.run(["postconf", "-c", str(self.config_dir), *args]).stdout
        if any(a in ("-e", "-M", "-X", "-#", "-P", "-MX", "-M#", "-PX") for a in args):
            self.settle_config()
        return out

    def settle_config(self) -> None:
        """Date back the configuration files written in the last seconds.  Postfix programs (postconf, and the
        master at start) wait about 2 s before reading a main.cf modified within the last seconds (measured: the
        first postconf after a write took 1.8 s, the next 9 ms); the tests write it right before each use."""
        past = time.time() - 10
        for f in self.config_dir.iterdir():
            with contextlib.suppress(OSError):
                if f.is_file() and f.stat().st_mtime > past:
                    os.utime(f, (past, past))

    def set(self, **settings: str) -> None:
        """``main.cf`` settings, e.g. ``pf.set(smtp_tls_security_level="dane")``."""
        if settings:
            self.postconf("-e", *(f"{k} = {v}" for k, v in settings.items()))

    def add_service(self, name: str, kind: str, line: str) -> None:
        """A ``master.cf`` entry, e.g. ``add_service("smtprt", "unix", "unix - - n - - smtp -o ...")``."""
        self.postconf("-M", f"{name}/{kind} = {name} {line}")

    # --- running commands ---------------------------------------------------------------------------

    def _ns_script(self, final: Sequence[str]) -> str:
        """Shell commands that set up the namespace's mounts, then ``exec`` ``final`` (in the root)."""
        q = shlex.quote
        resolv = q(str(self.state / "dns" / "resolv.conf"))
        lines = ["set -e", "mount --make-rprivate /"]
        if self.pv.root is None:
            lines.append(f"mount --bind {resolv} /etc/resolv.conf")
            lines.append("exec " + " ".join(q(a) for a in final))
        else:
            r = str(self.pv.root)
            st = r + str(self.state)
            lines += [
                f"mount -t proc proc {q(r + '/proc')}",
                f"mount --rbind /dev {q(r + '/dev')}",
                f"mount --bind {resolv} {q(r + '/etc/resolv.conf')}",
                f"mkdir -p {q(st)}",
                f"mount --bind {q(str(self.state))} {q(st)}",
                "exec chroot " + q(r) + " " + " ".join(q(a) for a in final),
            ]
        return "\n".join(lines)

    def run(
        self, argv: Sequence[str], check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as this Postfix sees the world: in its root, its namespaces, ``MAIL_CONFIG`` set.

        When the instance runs, the command joins its mount and PID namespaces (so ``postfix reload`` and
        friends signal the right master); otherwise it gets a fresh one with the same mounts.
        """
        env = {**os.environ, "MAIL_CONFIG": str(self.config_dir), "PATH": _PATH}
        master = self._master_pid()
        if master is not None:
            if self.pv.root is None:
                cmd = ["nsenter", "-t", str(master), "-m", "-p", "--", *argv]
            else:
                cmd = ["nsenter", "-t", str(master), "-m", "-p", "--", "chroot", str(self.pv.root), *argv]
        else:
            if self.pv.root is None and not (argv and Path(argv[0]).name == "postfix"):
                cmd = list(argv)
            else:
                cmd = ["unshare", "--mount", "--pid", "--fork", "--", "sh", "-c", self._ns_script(argv)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, input=input)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} (Postfix {self.version}) failed: {r.stdout}{r.stderr}")
        return r

    def run_host(
        self, argv: Sequence[str], check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a host command against this instance's config dir (``MAIL_CONFIG`` set), e.g. the project's
        ``requiretls postfix-config --apply``.  It sees the same paths Postfix will see."""
        env = {**os.environ, "MAIL_CONFIG": str(self.config_dir), "PATH": _PATH}
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {r.stdout}{r.stderr}")
        return r

    # --- life cycle ---------------------------------------------------------------------------------

    @property
    def _pidfile(self) -> Path:
        return self.dir / "instance.json"

    def _load_proc(self) -> procs.Proc | None:
        """The master (PID 1 of the instance's namespaces), as seen from the host."""
        if self._proc is None and self._pidfile.exists():
            self._proc = procs.Proc(**json.loads(self._pidfile.read_text())["master"])
        return self._proc

    def _master_pid(self) -> int | None:
        p = self._load_proc()
        return p.pid if p is not None and procs.alive(p) else None

    @property
    def running(self) -> bool:
        return self._master_pid() is not None

    def _children(self, comm: str) -> list[procs.Proc]:
        """The master's running children named ``comm`` (e.g. ``smtpd``), as seen from the host."""
        master = self._master_pid()
        if master is None:
            return []
        try:
            pids = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        except OSError:
            return []
        kids = []
        for pid in map(int, pids):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                    kids.append(procs.adopt(comm, pid, comm))
        return kids

    def reload(self, timeout: float = 30.0) -> None:
        """``postfix reload``, returned once it has taken effect for new SMTP sessions.

        The master logs "reload" before it reads main.cf again, and an idle smtpd of the old generation can
        still take the next connection until it notices the reload and exits: a test that connects right after
        the log line may meet the old settings (seen in CI: a new ``mynetworks`` not yet applied).  So wait until
        every smtpd that ran before the reload is gone."""
        self.settle_config()
        old = self._children("smtpd")
        mark = self.log_mark()
        self.run(["/usr/sbin/postfix", "-c", str(self.config_dir), "reload"])
        self.wait_log(r"reload", since=mark, timeout=timeout)
        end = time.monotonic() + timeout
        while any(procs.alive(p) for p in old):
            if time.monotonic() > end:
                left = [p.pid for p in old if procs.alive(p)]
                raise TimeoutError(f"smtpd {left} still running {timeout}s after reload (Postfix {self.version})")
            time.sleep(0.05)

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            raise RuntimeError(f"Postfix {self.version} already running")
        if not (self.config_dir / "main.cf").exists():
            self.reset()
        if not self.queue_dir.exists():
            self.queue_dir.mkdir(parents=True)
        # Postfix start-up waits ~2 s when main.cf was modified within the last seconds (measured: 2.3 s
        # versus 0.2 s); the tests rewrite it right before every start, so date it back.
        self.settle_config()
        script = self._ns_script(["/usr/sbin/postfix", "-c", str(self.config_dir), "start-fg"])
        launcher = procs.spawn(
            f"postfix-{self.version}-unshare",
            ["unshare", "--mount", "--pid", "--fork", "--kill-child=SIGKILL", "--", "sh", "-c", script],
            self.console_log,
            marker=str(self.config_dir),
        )
        # The namespace's PID 1 is unshare's only child; it execs its way to the master.
        end = time.monotonic() + 5
        kids: list[str] = []
        while not kids and time.monotonic() < end and procs.alive(launcher):
            with contextlib.suppress(OSError):
                kids = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
            time.sleep(0.01)
        if not kids:
            procs.stop(launcher)
            raise RuntimeError(f"Postfix {self.version}: namespace did not start\n{self._console_tail()}")
        self._proc = procs.adopt(f"postfix-{self.version}", int(kids[0]), str(self.config_dir))
        self._pidfile.write_text(json.dumps({"master": self._proc.__dict__, "launcher": launcher.__dict__}))
        try:
            procs.wait_tcp("127.0.0.1", self.ports.smtp, timeout, self._proc, self.console_log)
            procs.wait_tcp("127.0.0.1", self.ports.submission, timeout, self._proc, self.console_log)
        except Exception as e:
            self.stop()
            # Postfix prints fatal start-up errors only to a terminal: give it one.
            check = self.run(
                ["script", "-qec", f"postfix -c {self.config_dir} check", "/dev/null"], check=False
            )
            raise RuntimeError(
                f"Postfix {self.version} did not start: {e}\npostfix check: {check.stdout}{check.stderr}"
            ) from e

    def _console_tail(self) -> str:
        return self.console_log.read_text(errors="replace")[-3000:] if self.console_log.exists() else ""

    def stop(self, timeout: float = 15.0) -> None:
        """Stop like ``postfix stop`` (SIGTERM to the master), SIGKILL after ``timeout``.

        The master is PID 1 of its namespace, so when it goes every process of the instance goes too, and
        the mount namespace with its mounts.
        """
        master = self._load_proc()
        launcher = None
        if self._pidfile.exists():
            launcher = procs.Proc(**json.loads(self._pidfile.read_text())["launcher"])
        if master is not None:
            procs.stop(master, timeout=timeout)
        if launcher is not None:
            procs.stop(launcher, timeout=5)
        self._proc = None
        self._pidfile.unlink(missing_ok=True)
        for port in (self.ports.smtp, self.ports.submission):
            procs.wait_closed("127.0.0.1", port)

    # --- mail ---------------------------------------------------------------------------------------

    def submit(
        self,
        sender: str,
        recipients: Sequence[str],
        message: EmailMessage | bytes | str | None = None,
        *,
        port: str = "submission",
        starttls: bool = False,
        mail_options: Sequence[str] = (),
        rcpt_options: Sequence[str] = (),
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> Submitted:
        """Submit over SMTP (smtplib) to the ``submission`` or ``smtp`` port; return the queue id.

        ``message`` defaults to a small test message; ``headers`` are added to it.  An SMTP error raises
        ``smtplib.SMTPResponseException``.
        """
        if message is None:
            msg = EmailMessage()
            msg["From"] = sender
            msg["To"] = ", ".join(recipients)
            msg["Subject"] = "testbed message"
            msg["Message-ID"] = f"<{time.time_ns()}@{POSTFIX_HOSTNAME}>"
            msg.set_content("Hello from the requiretls testbed.\n")
            message = msg
        if isinstance(message, EmailMessage):
            for k, v in (headers or {}).items():
                message[k] = v
            data = message.as_bytes()
        else:
            data = message.encode() if isinstance(message, str) else message
        p = self.ports.submission if port == "submission" else self.ports.smtp
        with smtplib.SMTP("127.0.0.1", p, timeout=timeout, local_hostname="client.local.test") as s:
            s.ehlo()
            if starttls:
                ctx = ssl.create_default_context(cafile=str(self.state / "pki" / "ca.pem"))
                ctx.check_hostname = False
                s.starttls(context=ctx)
                s.ehlo()
            code, resp = s.mail(sender, list(mail_options))
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, resp, sender)
            for r in recipients:
                code, resp = s.rcpt(r, list(rcpt_options))
                if code not in (250, 251):
                    raise smtplib.SMTPRecipientsRefused({r: (code, resp)})
            code, resp = s.data(data)
            if code != 250:
                raise smtplib.SMTPDataError(code, resp)
        reply = resp.decode(errors="replace")
        m = re.search(r"queued as ([0-9A-Za-z]+)", reply)
        return Submitted(m.group(1) if m else "", reply)

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def log_since(self, since: int) -> str:
        """The log from the byte offset ``since`` (a :meth:`log_mark`) on."""
        if not self.maillog.exists():
            return ""
        with open(self.maillog, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def log_mark(self) -> int:
        """Current end of the log; pass as ``since`` to look only at what comes after."""
        return self.maillog.stat().st_size if self.maillog.exists() else 0

    def find_log(self, pattern: str, since: int = 0) -> LogMatch | None:
        if not self.maillog.exists():
            return None
        data = self.log_since(since)
        rx = re.compile(pattern)
        pos = 0
        for line in data.splitlines(keepends=True):
            pos += len(line.encode(errors="replace"))
            m = rx.search(line)
            if m:
                return LogMatch(line.rstrip("\n"), m, since + pos)
        return None

    def wait_log(self, pattern: str, timeout: float = 30.0, since: int = 0) -> LogMatch:
        """Wait for a log line matching ``pattern`` (re.search) after offset ``since``."""
        end = time.monotonic() + timeout
        while True:
            m = self.find_log(pattern, since)
            if m is not None:
                return m
            if time.monotonic() > end:
                tail = self.log()[-4000:]
                raise TimeoutError(
                    f"no log line /{pattern}/ after {timeout}s (Postfix {self.version}):\n{tail}"
                )
            time.sleep(0.1)

    def queue_ids(self) -> list[str]:
        """IDs of all queued messages (``postqueue -j``)."""
        out = self.run(["postqueue", "-c", str(self.config_dir), "-j"]).stdout
        return [json.loads(line)["queue_id"] for line in out.splitlines() if line.strip()]

    def queue_empty(self) -> bool:
        return not self.queue_ids()

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not self.queue_empty():
            if time.monotonic() > end:
                raise TimeoutError(f"queue not empty after {timeout}s: {self.queue_ids()}")
            time.sleep(0.2)

    def flush(self) -> None:
        """``postqueue -f``: retry deferred mail now."""
        self.run(["postqueue", "-c", str(self.config_dir), "-f"])

    def postcat(self, queue_id: str, *flags: str) -> str:
        """``postcat -c DIR [flags] -q QUEUE_ID`` (e.g. ``"-e"`` for envelope, ``"-h"`` for headers)."""
        return self.run(["postcat", "-c", str(self.config_dir), *flags, "-q", queue_id]).stdout
