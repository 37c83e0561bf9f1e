"""The package's life cycle on clean Debian 12 machines: remove and purge under a running Postfix, upgrade from
the previous package, install on a Sendmail host.

Each test copies a cached debootstrap chroot (scripts/build-testchroot.sh: ``bookworm-base`` with Postfix 3.7,
``bookworm-sendmail`` with Debian's Sendmail; the package's dependencies in their apt caches, so installs need
no network) and runs it as a :class:`~tests.packaging.chroots.Box`: private PID, mount and network namespaces,
loopback only, so Postfix (or Sendmail) and the package's daemons run there on 127.0.0.1:25 as on a real host,
and apt's maintainer scripts see them running.  Mail goes to a local mailbox (``bob``) in the box.

The previous package is the .deb built from commit 7250120 (the main line just before issue 15 landed: the
``requiretls.backup/`` configuration, no prerm, ``Recommends: postfix``) by scripts/build-prev-deb.sh, with the
Debian revision 0~COMMIT so that the current package (same upstream version) is an upgrade of it.  There is no
release tag; that commit is the package an admin installed before the journal and the prerm came.

Cost with the chroots cached: 100-145 s on 2 CPUs (four copies of a chroot, 25-35 s each); the previous
package is built once (10 s) and cached under CACHE/prev-deb.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.packaging.chroots import (
    CACHE,
    CONFIG,
    ROOT,
    SOCKDIR,
    Box,
    Deb,
    copy_chroot,
    dpkg_status,
    postfix_files,
    queue_id,
    smtp_send,
    stop_group,
    tail,
    wait_for,
)

pytestmark = pytest.mark.deb

PREVIOUS = "7250120"  # see the module docstring
DAEMONS = ("milter", "policyd", "relay")


@pytest.fixture(scope="session")
def maybe_prev_deb(deb: Deb) -> Path | str:
    """The previous package, or why there is none (the commit is not in this clone)."""
    r = subprocess.run(["sh", "scripts/build-prev-deb.sh", PREVIOUS], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    if r.returncode == 3:
        return tail(r)
    assert r.returncode == 0, tail(r)
    debs = list((CACHE / "prev-deb").glob(f"{PREVIOUS}*/requiretls_*_all.deb"))
    assert len(debs) == 1, debs
    return debs[0]


@pytest.fixture
def prev_deb(maybe_prev_deb: Path | str) -> Path:
    if isinstance(maybe_prev_deb, str):
        pytest.skip(maybe_prev_deb)
    return maybe_prev_deb


class Host:
    """A box with Postfix (or Sendmail) and the package's daemons, as on a real machine."""

    def __init__(self, box: Box, logs: Path) -> None:
        self.box = box
        self.logs = logs
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.sent = 0

    def run_ok(self, *args: str, timeout: float = 300) -> str:
        r = self.box.run(*args, timeout=timeout)
        assert r.returncode == 0, f"{' '.join(args)}: {tail(r)}"
        return r.stdout + r.stderr

    def smtpds(self) -> set[tuple[int, str]]:
        """The box's smtpd processes, each as (pid, start time)."""
        found = set()
        for d in Path("/proc").iterdir():
            with contextlib.suppress(OSError, IndexError):
                if d.name.isdigit() and (d / "comm").read_text().strip() == "smtpd" \
                        and os.readlink(d / "root") == str(self.box.root):
                    found.add((int(d.name), (d / "stat").read_text().rsplit(")", 1)[1].split()[19]))
        return found

    def reload_postfix(self) -> None:
        """``postfix reload``, returned once no smtpd from before it is left: an idle one of the old generation
        can take the next connection, with the old settings, until it notices the reload and exits."""
        old = self.smtpds()
        self.run_ok("postfix", "reload")
        self.wait_reloaded(old)

    def wait_reloaded(self, old: set[tuple[int, str]]) -> None:
        """Until the smtpd processes ``old`` (:meth:`smtpds` before a reload) are gone."""
        wait_for(lambda: not (old & self.smtpds()), "the smtpd processes from before the reload to exit")

    def install(self, deb: Path) -> str:
        shutil.copy(deb, self.box.root / "tmp" / deb.name)
        return self.run_ok("apt-get", "install", "-y", "-q", f"/tmp/{deb.name}", timeout=600)

    def start_daemons(self, names: tuple[str, ...] = DAEMONS, tcp: list[tuple[str, int]] | None = None) -> None:
        """The package's daemons from the installed files, as their units start them (socket-dir as root, then
        the daemon as _requiretls); returns once each listens: on its unix socket in Postfix's spool, or on
        ``tcp`` (host, port) where the config says so."""
        self.stop_daemons()
        self.run_ok("/usr/libexec/requiretls/socket-dir")
        n = self.log("milter").count("milter listening on ")
        for name in names:
            log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the process holds it
            self.daemons[name] = self.box.popen(["requiretls", name, "--config", CONFIG], log, user="_requiretls")
            log.close()
        if "milter" in names:
            wait_for(lambda: self.log("milter").count("milter listening on ") > n
                     or self.daemons["milter"].poll() is not None, "the milter's socket")
            assert self.daemons["milter"].poll() is None, self.log("milter")
        # The milter logs "listening" before libmilter binds, and the others chmod their socket after binding:
        # ready is when the MTA can connect to each (Postfix: as its user, to the sockets in its spool).
        if tcp is None:
            targets, user = [f"{SOCKDIR}/{name}.sock" for name in names], "postfix"
        else:
            targets, user = [f"{host}:{port}" for host, port in tcp], None
        probe = ("import socket, sys, time\n"
                 "end = time.monotonic() + 30\n"
                 "for target in sys.argv[1:]:\n"
                 "    while True:\n"
                 "        host, _, port = target.rpartition(':')\n"
                 "        s = socket.socket(socket.AF_UNIX) if target.startswith('/') else socket.socket()\n"
                 "        try:\n"
                 "            s.connect(target if target.startswith('/') else (host, int(port)))\n"
                 "            break\n"
                 "        except OSError:\n"
                 "            if time.monotonic() > end:\n"
                 "                raise\n"
                 "            time.sleep(0.05)\n"
                 "        finally:\n"
                 "            s.close()\n")
        r = self.box.run("python3", "-c", probe, *targets, user=user)
        assert r.returncode == 0, f"{tail(r)}\n" + "\n".join(self.log(name)[-1000:] for name in names)

    def stop_daemons(self) -> None:
        """What the units' stop does (the package's prerm stops them on removal; systemd restarts them on
        upgrade)."""
        for p in self.daemons.values():
            stop_group(p)
        self.daemons.clear()

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def postfix_log(self) -> str:
        path = self.box.root / "var/log/postfix.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def send_and_deliver(self, what: str) -> str:
        """An SMTP message to bob@localhost; returns its queue id once it is in bob's mailbox."""
        self.sent += 1
        mid = f"<{what.replace(' ', '-')}.{self.sent}@example.org>"
        reply = smtp_send(self.box, f"From: alice@example.org\nTo: bob@localhost\nSubject: {what}\n"
                          f"Message-ID: {mid}\n\n{what}\n", ["bob@localhost"])
        qid = queue_id(reply)
        mbox = self.box.root / "var/mail/bob"
        try:
            wait_for(lambda: mbox.exists() and mid in mbox.read_text(errors="replace"), f"{what} in bob's mailbox")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.postfix_log()}") from None
        return qid


@pytest.fixture
def postfix_host(tmp_path: Path) -> Iterator[Host]:
    """A copy of the base chroot with a local user bob and Postfix logging to /var/log/postfix.log (its
    postlogd: there is no syslog daemon in the box).  main.cf and master.cf after that are in tmp/postfix-before."""
    root = copy_chroot("bookworm-base", tmp_path / "root")
    box = Box(root)
    host = Host(box, tmp_path)
    try:
        host.run_ok("useradd", "-m", "bob")
        host.run_ok("postconf", "-e", "maillog_file = /var/log/postfix.log")
        host.run_ok("newaliases")
        (root / "tmp/postfix-before").write_bytes(postfix_files(root))
        yield host
    finally:
        host.stop_daemons()
        box.close()
        _discard(root, tmp_path)


def _discard(root: Path, keep: Path) -> None:
    """Remove a chroot copy (400 MB), keeping the MTA's log beside the daemons' logs."""
    for log in ("var/log/postfix.log",):
        if (root / log).exists():
            shutil.copy(root / log, keep / Path(log).name)
    shutil.rmtree(root, ignore_errors=True)


def _start_postfix(host: Host) -> None:
    host.run_ok("/usr/lib/postfix/configure-instance.sh", "-")  # what Debian's postfix unit runs first
    host.run_ok("postfix", "start")


def _no_trace_of_requiretls(root: Path) -> None:
    for name in ("main.cf", "master.cf"):
        text = (root / "etc/postfix" / name).read_text()
        assert "requiretls" not in text, f"{name} still mentions requiretls:\n{text}"
    assert not [p.name for p in (root / "etc/postfix").iterdir() if "requiretls" in p.name]


def test_remove_and_purge_under_running_postfix_leave_it_delivering(postfix_host: Host, deb: Deb) -> None:
    host, root = postfix_host, postfix_host.box.root
    before = (root / "tmp/postfix-before").read_bytes()
    host.install(deb.path)
    host.run_ok("requiretls", "postfix-config", "--apply")
    host.start_daemons()
    _start_postfix(host)
    qid = host.send_and_deliver("before removal")
    assert f"{qid}: requiretls: class=default" in host.log("milter"), host.log("milter")

    # An undo that cannot run (here: a damaged journal) stops the removal, names the command, changes nothing.
    journal = root / "etc/postfix/requiretls.journal"
    good, wired = journal.read_bytes(), postfix_files(root)
    journal.write_bytes(good[: len(good) // 2])
    r = host.box.run("apt-get", "remove", "-y", "-q", "requiretls", timeout=300)
    assert r.returncode != 0, tail(r)
    assert "unreadable journal" in r.stderr and "run 'requiretls postfix-config --apply --undo'" in r.stderr, tail(r)
    assert dpkg_status(host.box, "requiretls") == "install ok installed"
    assert postfix_files(root) == wired
    qid = host.send_and_deliver("removal refused")
    assert f"{qid}: requiretls: class=default" in host.log("milter"), host.log("milter")
    journal.write_bytes(good)

    # remove: prerm takes the wiring out and reloads the running Postfix, then the units stop.
    smtpds = host.smtpds()
    out = host.run_ok("apt-get", "remove", "-y", "-q", "requiretls")
    host.wait_reloaded(smtpds)  # prerm's reload
    host.stop_daemons()
    qid = host.send_and_deliver("after removal")  # with the milter still listed: 451 4.7.1 (tempfail)
    assert qid not in host.log("milter")
    assert "main.cf: removed smtpd_milters" in out, out
    assert dpkg_status(host.box, "requiretls") == "deinstall ok config-files"
    assert host.box.run("postfix", "status").returncode == 0, "Postfix stopped"
    _no_trace_of_requiretls(root)
    assert postfix_files(root) == before
    assert (root / "etc/requiretls/requiretls.toml").exists()  # a conffile: kept until purge

    # reinstall, wire again, then purge.
    host.install(deb.path)
    assert postfix_files(root) == before, "installing the package changed main.cf or master.cf"
    host.run_ok("requiretls", "postfix-config", "--apply")
    host.reload_postfix()
    host.start_daemons()
    qid = host.send_and_deliver("after reinstall")
    assert f"{qid}: requiretls: class=default" in host.log("milter"), host.log("milter")
    smtpds = host.smtpds()
    out = host.run_ok("apt-get", "purge", "-y", "-q", "requiretls")
    host.wait_reloaded(smtpds)  # prerm's reload
    host.stop_daemons()
    host.send_and_deliver("after purge")
    assert "main.cf: removed smtpd_milters" in out, out
    assert dpkg_status(host.box, "requiretls") == ""
    _no_trace_of_requiretls(root)
    assert postfix_files(root) == before
    assert not (root / "etc/requiretls").exists()
    assert not (root / "var/lib/requiretls").exists()
    assert not (root / SOCKDIR.lstrip("/")).exists()


@pytest.mark.parametrize("then", ["apply", "remove"])
def test_upgrade_from_the_previous_package_keeps_postfix_wired(postfix_host: Host, deb: Deb, prev_deb: Path,
                                                               then: str) -> None:
    """Upgrade from the package that kept a ``requiretls.backup/`` (no journal, no prerm).  Then either the
    documented step (``--check`` reports drift, ``--apply`` takes the backup over into the journal), or the
    package removed at once (prerm undoes by the old backup)."""
    host, root = postfix_host, postfix_host.box.root
    before = (root / "tmp/postfix-before").read_bytes()
    host.install(prev_deb)
    old_version = host.run_ok("dpkg-query", "-W", "-f=${Version}", "requiretls")
    assert "~" in old_version, old_version
    # The previous postfix-config read no config file by default: the README of its time passed --config.
    host.run_ok("requiretls", "postfix-config", "--config", CONFIG, "--apply")
    assert (root / "etc/postfix/requiretls.backup").is_dir()
    assert not (root / "etc/postfix/requiretls.journal").exists()
    host.start_daemons()
    _start_postfix(host)
    qid = host.send_and_deliver("before upgrade")
    assert f"{qid}: requiretls: class=default" in host.log("milter"), host.log("milter")
    wired = postfix_files(root)

    out = host.install(deb.path)
    new_version = host.run_ok("dpkg-query", "-W", "-f=${Version}", "requiretls")
    assert new_version == deb.path.name.split("_")[1], (new_version, out)
    assert postfix_files(root) == wired, "the upgrade changed main.cf or master.cf"
    check = host.box.run("requiretls", "postfix-config", "--check")
    if check.returncode == 1:  # postinst names the commands
        assert "requiretls: the Postfix configuration in /etc/postfix is not what this version writes" in out, out
    else:
        assert check.returncode == 0, tail(check)
        assert "not what this version writes" not in out, out
    host.start_daemons()  # systemd restarts the units on upgrade
    qid = host.send_and_deliver("after upgrade")
    assert f"{qid}: requiretls: class=default" in host.log("milter"), host.log("milter")

    if then == "apply":
        host.run_ok("requiretls", "postfix-config", "--apply")
        assert (root / "etc/postfix/requiretls.journal").exists()
        assert not (root / "etc/postfix/requiretls.backup").exists()
        r = host.box.run("requiretls", "postfix-config", "--check")
        assert r.returncode == 0, tail(r)
        host.reload_postfix()
        qid = host.send_and_deliver("after upgrade and apply")
        assert f"{qid}: requiretls: class=default" in host.log("milter"), host.log("milter")

    # Removing the upgraded package takes the wiring out, whichever way it was recorded.
    smtpds = host.smtpds()
    out = host.run_ok("apt-get", "remove", "-y", "-q", "requiretls")
    host.wait_reloaded(smtpds)  # prerm's reload
    host.stop_daemons()
    qid = host.send_and_deliver("after removal")
    assert qid not in host.log("milter")
    assert "main.cf: removed smtpd_milters" in out, out
    _no_trace_of_requiretls(root)
    assert postfix_files(root) == before


SENDMAIL_FQDN = "mail.sendmail.test"


def test_sendmail_host_keeps_sendmail_and_the_documented_milter_hookup_works(
        tmp_path: Path, deb: Deb, maybe_prev_deb: Path | str) -> None:
    root = copy_chroot("bookworm-sendmail", tmp_path / "root")
    box = Box(root)
    host = Host(box, tmp_path)
    try:
        shutil.copy(deb.path, root / "tmp" / deb.path.name)
        if isinstance(maybe_prev_deb, Path):
            # apt's plan: the previous package (Recommends: postfix) would have replaced Sendmail.
            shutil.copy(maybe_prev_deb, root / "tmp" / maybe_prev_deb.name)
            r = box.run("apt-get", "install", "-s", f"/tmp/{maybe_prev_deb.name}")
            assert r.returncode == 0, tail(r)
            assert re.search(r"^Remv sendmail-bin ", r.stdout, re.M), r.stdout
        r = box.run("apt-get", "install", "-s", f"/tmp/{deb.path.name}")
        assert r.returncode == 0, tail(r)
        assert not re.search(r"^(Remv|Purg) ", r.stdout, re.M), r.stdout
        assert not re.search(r"^Inst postfix ", r.stdout, re.M), r.stdout
        # ... and the real install.
        host.install(deb.path)
        assert dpkg_status(box, "requiretls") == "install ok installed"
        for p in ("sendmail-bin", "sendmail-cf"):
            assert dpkg_status(box, p) == "install ok installed", p
        assert dpkg_status(box, "postfix") in ("", "unknown ok not-installed")

        # contrib/sendmail/README.md (installed under examples/sendmail): milter on 127.0.0.1:8893, mta =
        # "sendmail", opt-out from trusted clients; the INPUT_MAIL_FILTER line in sendmail.mc.
        readme = (root / "usr/share/doc/requiretls/examples/sendmail/README.md").read_text()
        mc_line = re.search(r"^ *(INPUT_MAIL_FILTER\(`requiretls', `S=inet:8893@127\.0\.0\.1.*)$", readme, re.M)
        assert mc_line, "the README's INPUT_MAIL_FILTER line moved"
        cfg = root / CONFIG.lstrip("/")
        text = cfg.read_text()
        text = text.replace("[milter]\n", '[milter]\nsocket = "inet:127.0.0.1:8893"\nmta = "sendmail"\n', 1)
        text = text.replace("[policy]\n", '[policy]\noptout_from = "trusted"\n', 1)
        cfg.write_text(text)
        host.start_daemons(("milter",), tcp=[("127.0.0.1", 8893)])
        mc = (root / "etc/mail/sendmail.mc").read_text()
        # test-only: queue-only delivery (the message stays in the queue to be read), no DNS here.
        ours = ("define(`confDELIVERY_MODE', `queueonly')dnl\nFEATURE(`accept_unresolvable_domains')dnl\n"
                + mc_line.group(1) + "\n")
        mc = "\n".join(line for line in mc.splitlines() if "Name=MSP-v4" not in line and "greet_pause" not in line)
        (root / "etc/mail/sendmail.mc").write_text(mc.replace("MAILER_DEFINITIONS", ours + "MAILER_DEFINITIONS", 1))
        hosts = (root / "etc/hosts").read_text()
        hostname = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
        (root / "etc/hosts").write_text(f"127.0.0.1\t{SENDMAIL_FQDN} {hostname}\n" + hosts)
        (root / "etc/mail/local-host-names").write_text(f"{SENDMAIL_FQDN}\nlocalhost\n")
        host.run_ok("sh", "-c", "mkdir -p /run/sendmail/mta && m4 /etc/mail/sendmail.mc > /etc/mail/sendmail.cf")
        with open(tmp_path / "sendmail.log", "ab") as log:
            sendmail = box.popen(["/usr/sbin/sendmail-mta", "-bD", "-C/etc/mail/sendmail.cf"], log)
            host.daemons["sendmail"] = sendmail

        def listening() -> bool:
            assert sendmail.poll() is None, (tmp_path / "sendmail.log").read_text()
            return box.run("python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 25), 1)"
                           ).returncode == 0

        wait_for(listening, "sendmail on 127.0.0.1:25", 60)
        reply = smtp_send(box, "From: alice@example.org\nTo: bob@example.net\nSubject: [tls-optout] report\n"
                          "Message-ID: <sm@example.org>\n\nbody\n", ["bob@example.net"])
        qid = queue_id(reply)
        qf = (root / "var/spool/mqueue" / f"qf{qid}").read_text(errors="replace")
        assert re.search(r"^H(\?[^?]*\?)?Subject: report$", qf, re.M), qf
        assert re.search(r"^H(\?[^?]*\?)?TLS-Required: No$", qf, re.M), qf
        assert f"{qid}: requiretls: class=optout" in host.log("milter"), host.log("milter")
    finally:
        host.stop_daemons()
        box.close()
        _discard(root, tmp_path)
