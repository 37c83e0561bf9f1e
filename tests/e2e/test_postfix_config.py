"""``requiretls postfix-config`` on each testbed Postfix (3.7, 3.10, 3.11): the admin's later main.cf and
master.cf edits survive a second ``--apply`` and ``--undo``, and mail still flows through the re-applied
configuration."""

from __future__ import annotations

import subprocess
import sys

from tests.e2e.plugin import Plugin
from tests.testbed.bed import Bed
from tests.testbed.postfix import Postfix

SENDER = "alice@sender.test"
EDITS = {
    "smtpd_banner": "$myhostname ESMTP admin",
    "header_size_limit": "204800",
    "smtp_helo_timeout": "123s",
}


def _tool(p: Plugin, *a: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "requiretls", "postfix-config", "--config", str(p.config), "-c",
                           str(p.pf.config_dir), "--postfix-version", p.pf.version, *a],
                          capture_output=True, text=True, timeout=60)


def _n(pf: Postfix) -> set[str]:
    # config_directory: reported by the chroot's postconf -n from its second run on (see test_milter)
    return {line for line in pf.postconf("-n").splitlines() if not line.startswith("config_directory =")}


def test_admin_edits_survive_reapply_and_undo(bed: Bed, postfix: Postfix) -> None:
    p = Plugin(bed, postfix)
    p.write_config()
    postfix.postconf("-n")  # warm-up (see test_milter's apply/undo test)
    before_n = _n(postfix)
    assert _tool(p, "--apply").returncode == 0
    postfix.set(**EDITS, relayhost="[relay.admin.test]:587")
    postfix.add_service("submission", "inet", "inet n - n - - smtpd -o syslog_name=postfix/submission")
    edited = {f: (postfix.config_dir / f).read_bytes() for f in ("main.cf", "master.cf")}
    r = _tool(p, "--apply")
    assert r.returncode == 0 and "nothing to change" in r.stdout, r.stdout + r.stderr
    assert {f: (postfix.config_dir / f).read_bytes() for f in edited} == edited  # byte for byte
    assert _tool(p, "--check").returncode == 0
    r = _tool(p, "--apply", "--undo")
    assert r.returncode == 0, r.stderr
    after_n = _n(postfix)
    assert after_n - before_n == {f"{k} = {v}" for k, v in EDITS.items()} | {"relayhost = [relay.admin.test]:587"}
    assert before_n - after_n == set()
    assert "submission" in postfix.postconf("-M", "submission/inet")
    assert "requiretls" not in postfix.postconf("-M")


def test_mail_flows_after_admin_edits_and_reapply(plugin: Plugin) -> None:
    plugin.apply()
    plugin.pf.set(**EDITS)
    plugin.apply()  # the second apply keeps the edits and changes nothing of ours
    assert plugin.pf.postconf("-h", "smtp_helo_timeout").strip() == "123s"
    plugin.start()
    q = plugin.pf.submit(SENDER, ["bob@dane.test"])
    (d,) = plugin.wait_mx("dane")
    assert d.tls is True
    assert f"{q.queue_id}: requiretls:" in plugin.log("milter")
