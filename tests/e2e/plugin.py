"""The plugin wired into a testbed Postfix exactly as an admin would: ``requiretls postfix-config --apply``,
then the milter, the delivery agent and (optionally) policyd started as separate processes."""

from __future__ import annotations

import fcntl
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.testbed.bed import DEFAULT_STATE, Bed
from tests.testbed.hosts import UNBOUND_IP
from tests.testbed.postfix import Postfix
from tests.testbed.procs import accepts_unix

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Plugin:
    bed: Bed
    pf: Postfix
    table: str = ""
    senders: str = ""
    policy: str = ""  # extra [policy] lines
    extra: str = ""  # extra TOML sections
    milter_extra: str = ""  # extra [milter] lines
    relay_extra: str = ""  # extra [relay] lines
    relay_helo: str | None = "relay.local.test"  # relay.helo_name; None: Postfix's myhostname
    mta_sts_extra: str = ""  # extra [mta_sts] lines
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    apply_args: tuple[str, ...] = ()  # extra postfix-config arguments, e.g. ("--policyd",)

    def __post_init__(self) -> None:
        self.dir = self.pf.dir / "requiretls"
        self.dir.mkdir(parents=True, exist_ok=True)
        # One test's daemons, one set of logs: a line an earlier test left there must not satisfy this one's
        # checks (the instance and its directory outlive the test).
        for old_log in self.dir.glob("*.log"):
            old_log.unlink()
        q = self.pf.queue_dir
        self.milter_sock = q / "requiretls" / "milter.sock"
        self.relay_sock = q / "requiretls" / "relay.sock"
        self.policyd_sock = q / "requiretls" / "policyd.sock"
        self.reinject_port = self.pf.ports.extra[0]
        # extra[1..3] are the tests' own (content filter and its return port, an LMTP server)
        self.reinject_local_port = self.pf.ports.extra[9]
        self.config = self.dir / "requiretls.toml"

    def write_config(self) -> None:
        (self.dir / "policy").write_text(self.table)
        (self.dir / "senders").write_text(self.senders)
        ca = self.bed.pki.ca_cert
        self.config.write_text(
            f"""[policy]
table = "policy"
sender_table = "senders"
{self.policy}
[dns]
resolver = "{UNBOUND_IP}:53"
timeout = 3
[mta_sts]
cafile = "{ca}"
fetch_timeout = 5
{self.mta_sts_extra}
[milter]
socket = "unix:{self.milter_sock}"
socket_mode = "0666"
{self.milter_extra}
[relay]
listen = "unix:{self.relay_sock}"
reinject = "127.0.0.1:{self.reinject_port}"
reinject_local = "127.0.0.1:{self.reinject_local_port}"
cafile = "{ca}"
{f'helo_name = "{self.relay_helo}"' if self.relay_helo is not None else ""}
postfix_config_dir = "{self.pf.config_dir}"
timeout = 10
spool_dir = "{self.dir / 'spool'}"
{self.relay_extra}
[policyd]
listen = ["unix:{self.policyd_sock}"]
{self.extra}
"""
        )

    def apply(self) -> None:
        self.write_config()
        r = subprocess.run(
            [sys.executable, "-m", "requiretls", "postfix-config", "--config", str(self.config),
             "-c", str(self.pf.config_dir), "--postfix-version", self.pf.version, "--apply", *self.apply_args],
            capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 0, r.stderr + r.stdout
        self.pf.settle_config()  # the daemons read main.cf with postconf at once

    def start_daemon(self, name: str) -> None:
        self.start_daemons((name,))

    def start_daemons(self, names: tuple[str, ...]) -> None:
        """Start the daemons at once and wait until each listens (their start-up overlaps)."""
        socks = {"milter": self.milter_sock, "relay": self.relay_sock, "policyd": self.policyd_sock}
        for name in names:
            if socks[name].exists():
                socks[name].unlink()
            logf = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the child's lifetime
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "requiretls", name, "--config", str(self.config)],
                stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            )
        end = time.monotonic() + 15
        for name in names:
            while not accepts_unix(socks[name]):
                if self.procs[name].poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"{name} did not start:\n{self.log(name)[-3000:]}")
                time.sleep(0.02)

    def stop_daemon(self, name: str, sig: int = signal.SIGTERM) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, daemons: tuple[str, ...] = ("milter", "relay", "policyd")) -> None:
        self.apply()
        self.start_daemons(daemons)
        self.pf.start()

    def start_with_sasl(self, sasl_port: int, daemons: tuple[str, ...] = ("milter", "relay", "policyd")) -> None:
        """:meth:`start`, with Postfix's smtpd authenticating through a Dovecot-protocol SASL server (tests/e2e/
        sasl.py) on ``sasl_port``."""
        self.apply()
        self.pf.set(smtpd_sasl_auth_enable="yes", smtpd_sasl_type="dovecot",
                    smtpd_sasl_path=f"inet:127.0.0.1:{sasl_port}")
        self.start_daemons(daemons)
        self.pf.start()

    def submit_authenticated(self, user: str, password: str, sender: str, rcpts: list[str], msg: bytes) -> None:
        """One message over the submission port after SASL AUTH."""
        with smtplib.SMTP("127.0.0.1", self.pf.ports.submission, timeout=30) as s:
            s.ehlo("client.local.test")
            s.login(user, password)
            s.sendmail(sender, rcpts, msg)

    def stop(self) -> None:
        for name in list(self.procs):
            self.stop_daemon(name)

    def wait_mx(self, key: str, n: int = 1, timeout: float = 30) -> list:  # type: ignore[type-arg]
        return self.bed.mx(key).wait_for(n, timeout=timeout)


#: The test sessions' lock (tests/conftest.py): a script takes it too, so that no test session clears the MX
#: records or toggles DNS under a benchmark or the demo (and the other way round).
SESSION_LOCK = Path("/run/requiretls-testbed.session.lock")


@contextmanager
def testbed_turn() -> Iterator[None]:
    """Wait for the test session (or script) that uses the bed, then hold the bed until the end."""
    with open(SESSION_LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for the session holding {SESSION_LOCK}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def running_bed() -> Iterator[Bed]:
    """The bed for a script (demo, benchmark), in its turn: the one already up, or one started here and
    stopped after."""
    with testbed_turn():
        bed = Bed.current()
        if bed is not None:
            yield bed
            return
        bed = Bed(DEFAULT_STATE)
        bed.start()
        try:
            yield bed
        finally:
            bed.stop()
