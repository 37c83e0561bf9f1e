"""Debian chroots for the package tests: the package built as ``make deb`` builds it, cached debootstrap chroots
(scripts/build-testchroot.sh) copied per test, and a copy run as a small machine of its own (:class:`Box`)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("RTLS_TESTBED_CACHE", "/var/cache/requiretls-testbed"))
CONFIG = "/etc/requiretls/requiretls.toml"
SOCKDIR = "/var/spool/postfix/requiretls"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}


def tail(r: subprocess.CompletedProcess[str]) -> str:
    return ((r.stdout or "") + (r.stderr or "")).strip()[-3000:]


@dataclass(frozen=True)
class Deb:
    path: Path
    lintian: str


def build_deb() -> Deb:
    """The package of this work tree (scripts/build-deb.sh --lint, as ``make deb``)."""
    if os.environ.get("RTLS_DEB_TESTS", "1") == "0":
        pytest.skip("RTLS_DEB_TESTS=0")
    if os.geteuid() != 0:
        pytest.skip("building and installing the package needs root (apt, chroot)")
    r = subprocess.run(["sh", "scripts/build-deb.sh", "--deps-only"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        pytest.skip(f"cannot install the build dependencies: {tail(r)}")
    r = subprocess.run(["sh", "scripts/build-deb.sh", "--lint"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, tail(r)
    debs = sorted((ROOT / "build/deb").glob("requiretls_*_all.deb"))
    assert len(debs) == 1, debs
    return Deb(debs[0], (ROOT / "build/deb/lintian.log").read_text())


def cached_chroot(name: str) -> Path:
    """CACHE/NAME, built by scripts/build-testchroot.sh if missing; skipped with the reason if it cannot be."""
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (scripts/install-apt.sh installs it)")
    r = subprocess.run(["sh", str(ROOT / "scripts/build-testchroot.sh"), name], capture_output=True, text=True,
                       timeout=1800)
    if r.returncode != 0:
        pytest.skip(f"cannot build the chroot {name}: {tail(r)}")
    return CACHE / name


def copy_chroot(name: str, dest: Path) -> Path:
    subprocess.run(["cp", "-a", "--reflink=auto", str(cached_chroot(name)), str(dest)], check=True)
    return dest


@dataclass
class Chroot:
    root: Path

    def run(self, *args: str, user: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 120, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(args, user), capture_output=True, text=True, timeout=timeout,
                              input=stdin, env=ENV | (env or {}))

    def command(self, args: Sequence[str], user: str | None = None) -> list[str]:
        """``args`` inside the chroot (with its own /proc, in a private mount namespace), as ``user``."""
        if user is not None:
            args = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *args]
        return ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                'root=$1; shift; mount -t proc proc "$root/proc"; cd "$root"; exec chroot "$root" "$@"',
                "chroot", str(self.root), *args]


class Box(Chroot):
    """A chroot run as a machine of its own: private PID, mount and network namespaces (loopback only, so
    Postfix or Sendmail listen on 127.0.0.1:25 without meeting the host's), PID 1 a ``sleep``.  Commands enter
    it with nsenter; the daemons started in it (a Postfix master, the package's daemons) end with it:
    :meth:`close` kills its PID 1."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._holder = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--net", "--propagation", "private", "--kill-child=SIGKILL",
             "--", "sh", "-ec", 'ip link set lo up; mount -t proc proc "$1/proc"; exec chroot "$1" sleep infinity',
             "box", str(root)],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pid = 0
        end = time.monotonic() + 30
        children = Path(f"/proc/{self._holder.pid}/task/{self._holder.pid}/children")
        try:
            while time.monotonic() < end:
                assert self._holder.poll() is None, self._holder.stderr.read() if self._holder.stderr else ""
                with contextlib.suppress(OSError, ValueError, IndexError):
                    pid = int(children.read_text().split()[0])
                    if os.readlink(f"/proc/{pid}/root") == str(root) and \
                            Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0"):
                        self.pid = pid
                        return
                time.sleep(0.05)
            raise AssertionError("the box's PID 1 did not start")
        except BaseException:
            self.close()  # the holder's process group (unshare and its child) goes
            raise

    def command(self, args: Sequence[str], user: str | None = None) -> list[str]:
        if user is not None:
            args = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *args]
        return ["nsenter", "-t", str(self.pid), "-m", "-p", "-n", "-r", "-w", "--", *args]

    def popen(self, args: Sequence[str], log: IO[bytes], user: str | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command(args, user), stdout=log, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)

    def close(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # every process of the PID namespace goes with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._holder.pid, signal.SIGKILL)
        self._holder.wait(30)
        if self._holder.stderr:
            self._holder.stderr.close()


def stop_group(p: subprocess.Popen[bytes]) -> None:
    """Stop a process started with :meth:`Box.popen`: nsenter does not pass signals on, so the whole process
    group (nsenter and the command in the box) gets them."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)  # the command may outlive nsenter


def dpkg_status(chroot: Chroot, package: str) -> str:
    """``install ok installed``, ``deinstall ok config-files``, or "" when dpkg does not know the package."""
    r = chroot.run("dpkg-query", "-W", "-f=${Status}", package)
    return r.stdout.strip() if r.returncode == 0 else ""


def postfix_files(root: Path) -> bytes:
    return (root / "etc/postfix/main.cf").read_bytes() + (root / "etc/postfix/master.cf").read_bytes()


def wait_for(pred: object, what: str, timeout: float = 30.0) -> None:
    assert callable(pred)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


SMTP_CLIENT = r"""
import smtplib, sys
host, port, sender, *rcpts = sys.argv[1:]
msg = sys.stdin.read().replace("\n", "\r\n").encode()
with smtplib.SMTP(host, int(port), local_hostname="client.test", timeout=60) as s:
    s.ehlo()
    code, text = s.mail(sender)
    if code != 250:
        sys.exit(f"MAIL FROM: {code} {text.decode()}")
    for r in rcpts:
        code, text = s.rcpt(r)
        if code != 250:
            sys.exit(f"RCPT {r}: {code} {text.decode()}")
    code, text = s.data(msg)
    print(code, text.decode())
    if code != 250:
        sys.exit(1)
"""


def smtp_send(box: Box, message: str, rcpts: Sequence[str], sender: str = "alice@example.org",
              port: int = 25) -> str:
    """Send over SMTP to 127.0.0.1:PORT from inside the box (its python3); return the server's 250 text."""
    r = box.run("python3", "-c", SMTP_CLIENT, "127.0.0.1", str(port), sender, *rcpts, stdin=message, timeout=90)
    assert r.returncode == 0, f"SMTP send failed: {tail(r)}"
    return r.stdout.strip()


def queue_id(reply: str) -> str:
    m = re.search(r"queued as ([0-9A-Za-z]+)", reply) or re.search(r"([0-9A-Za-z]{14}) Message accepted", reply)
    assert m, reply
    return m.group(1)
