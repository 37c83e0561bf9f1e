"""The milter and the generated Postfix configuration on real Postfix (issue 6), each version present.

Every test wires the plugin in as an admin would (``requiretls postfix-config --apply``, then the daemons) and
asserts on what the test MX servers received, not only on logs.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
import time

import pytest

from tests.e2e.plugin import Plugin
from tests.e2e.sasl import PASSWORD, SaslServer
from tests.testbed.bed import Bed
from tests.testbed.postfix import Postfix

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]

SENDER = "alice@sender.test"
LOCAL = "nobody@postfix.local.test"


def _no_delivery(bed: Bed, key: str, seconds: float = 3.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert bed.mx(key).deliveries() == [], f"MX {key} received a message it must not get"
        time.sleep(0.2)


def test_tls_required_no_from_trusted_client_is_delivered_opportunistically(plugin: Plugin) -> None:
    """RFC 8689 §4.2.2: a DANE domain whose MX has no STARTTLS still gets the opted-out message."""
    plugin.start()
    q = plugin.pf.submit(SENDER, ["bob@dane-nostarttls.test"], headers={"TLS-Required": "No"})
    (d,) = plugin.wait_mx("dane-nostarttls")
    assert d.tls is False and d.rcpt_tos == ("bob@dane-nostarttls.test",)
    assert d.message["TLS-Required"] == "No"  # carried on for the next hops (RFC 8689 §4.1)
    assert "X-RequireTLS-Route" not in d.message
    assert f"{q.queue_id}: requiretls: class=optout, route=relaxed" in plugin.log("milter")
    plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@dane-nostarttls.test>.*status=sent")


def test_tls_required_no_to_optout_no_destination_is_deferred_not_sent_in_clear(plugin: Plugin) -> None:
    plugin.table = "dane-nostarttls.test optout=no\n"
    plugin.start()
    q = plugin.pf.submit(SENDER, ["bob@dane-nostarttls.test"], headers={"TLS-Required": "No"})
    plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@dane-nostarttls.test>.*status=deferred")
    _no_delivery(plugin.bed, "dane-nostarttls")
    assert "optout=no" in plugin.log("milter")


def test_untrusted_tls_required_no_with_optout_trusted_changes_nothing(plugin: Plugin) -> None:
    plugin.policy = 'optout_from = "trusted"\ntrusted_networks = ["10.0.0.0/8"]'
    plugin.start()
    q = plugin.pf.submit(SENDER, ["bob@dane-nostarttls.test"], headers={"TLS-Required": "No"})
    plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@dane-nostarttls.test>.*status=deferred")
    _no_delivery(plugin.bed, "dane-nostarttls")


def test_optout_cookie_from_untrusted_client_changes_nothing(plugin: Plugin) -> None:
    plugin.policy = 'optout_from = "trusted"\ntrusted_networks = ["10.0.0.0/8"]'
    plugin.start()
    subject = "=?utf-8?q?=5Btls-optout=5D_Gr=C3=BC=C3=9Fe?="
    msg = f"From: {SENDER}\r\nTo: bob@dane.test\r\nSubject: {subject}\r\n\r\nbody\r\n"
    plugin.pf.submit(SENDER, ["bob@dane.test"], msg)
    (d,) = plugin.wait_mx("dane")
    assert d.tls is True
    assert "[tls-optout]" in str(d.message["Subject"])
    assert "TLS-Required" not in d.message


def test_optout_cookie_from_sasl_authenticated_sender_opts_out_and_is_removed(plugin: Plugin) -> None:
    """The client address is not trusted (trusted_networks excludes loopback); SASL authentication is."""
    plugin.policy = 'optout_from = "trusted"\ntrusted_networks = ["10.0.0.0/8"]'
    subject = "=?utf-8?q?=5Btls-optout=5D_Gr=C3=BC=C3=9Fe?="
    msg = f"From: {SENDER}\r\nTo: bob@dane-nostarttls.test\r\nSubject: {subject}\r\n\r\nbody\r\n"
    with SaslServer() as sasl:
        plugin.start_with_sasl(sasl.port)
        plugin.submit_authenticated("alice", PASSWORD, SENDER, ["bob@dane-nostarttls.test"], msg.encode())
        (d,) = plugin.wait_mx("dane-nostarttls")
    assert "sasl_username=alice" in plugin.log("milter")
    assert d.tls is False
    assert str(d.message["Subject"]) == "Grüße"
    assert d.message["TLS-Required"] == "No"


def test_forged_route_header_is_removed_and_normal_policy_applies(plugin: Plugin) -> None:
    plugin.start()
    q = plugin.pf.submit(SENDER, ["bob@dane-nostarttls.test"], headers={"X-RequireTLS-Route": "relaxed"})
    plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@dane-nostarttls.test>.*status=deferred")
    _no_delivery(plugin.bed, "dane-nostarttls")
    plugin.pf.submit(SENDER, ["bob@dane.test"], headers={"X-RequireTLS-Route": "relaxed"})
    (d,) = plugin.wait_mx("dane")
    assert d.tls is True and "X-RequireTLS-Route" not in d.message


def test_local_and_remote_recipient_of_an_optout_message_each_delivered_once(plugin: Plugin) -> None:
    plugin.start()
    q = plugin.pf.submit(SENDER, [LOCAL, "bob@dane-nostarttls.test"], headers={"TLS-Required": "No"})
    (d,) = plugin.wait_mx("dane-nostarttls")
    assert d.rcpt_tos == ("bob@dane-nostarttls.test",) and d.tls is False
    plugin.pf.wait_log(r"to=<nobody@postfix.local.test>.*relay=local.*status=sent")
    plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@dane-nostarttls.test>.*status=sent")
    plugin.pf.wait_queue_empty()  # then a second copy would be on its way
    time.sleep(1)
    log = plugin.pf.log()
    assert "loops back to myself" not in log and "status=bounced" not in log
    assert len(plugin.bed.mx("dane-nostarttls").deliveries()) == 1
    mbox = (plugin.pf.dir / "mail" / "nobody").read_text(errors="replace")
    assert mbox.count("\nSubject: testbed message") == 1
    assert "X-RequireTLS" not in mbox


def test_milter_down_tempfails_and_the_retry_is_delivered_once(plugin: Plugin) -> None:
    plugin.start(daemons=("relay", "policyd"))  # no milter running: its socket is absent
    with pytest.raises(smtplib.SMTPResponseException) as exc:
        plugin.pf.submit(SENDER, ["bob@dane.test"])
    assert 400 <= exc.value.smtp_code < 500
    _no_delivery(plugin.bed, "dane", 1.0)
    plugin.start_daemon("milter")
    plugin.pf.submit(SENDER, ["bob@dane.test"])
    (d,) = plugin.wait_mx("dane")
    assert d.tls is True
    plugin.pf.wait_queue_empty()
    time.sleep(1)
    assert len(plugin.bed.mx("dane").deliveries()) == 1


def test_postfix_config_apply_then_undo_restores_postconf(bed: Bed, postfix: Postfix) -> None:
    p = Plugin(bed, postfix)
    p.write_config()

    def conf() -> tuple[list[str], str]:
        # config_directory: Postfix 3.10+'s postconf -n lists it or not depending on main.cf's mtime (seen with
        # a main.cf written in the same second); it is not a setting of ours or of the test
        n = [line for line in postfix.postconf("-n").splitlines() if not line.startswith("config_directory =")]
        return n, postfix.postconf("-M")

    before = conf()
    files = {f: (postfix.config_dir / f).read_bytes() for f in ("main.cf", "master.cf")}

    def tool(*a: str) -> None:
        r = subprocess.run([sys.executable, "-m", "requiretls", "postfix-config", "--config", str(p.config), "-c",
                            str(postfix.config_dir), "--postfix-version", postfix.version, *a],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    tool("--apply")
    applied = conf()
    applied_files = {f: (postfix.config_dir / f).read_bytes() for f in files}
    assert applied != before and any("requiretls/milter.sock" in line for line in applied[0])
    tool("--apply")
    assert conf() == applied
    assert {f: (postfix.config_dir / f).read_bytes() for f in files} == applied_files  # nothing rewritten
    tool("--apply", "--undo")
    assert conf() == before
    assert {f: (postfix.config_dir / f).read_bytes() for f in files} == files
    assert sorted(f.name for f in postfix.config_dir.iterdir()) == ["main.cf", "master.cf"]


def test_postfix_3_11_requiretls_over_starttls_is_seen_by_the_milter(plugin: Plugin) -> None:
    if plugin.pf.version != "3.11":
        pytest.skip("MAIL FROM REQUIRETLS is received only by Postfix 3.11+")
    plugin.start(daemons=("milter", "relay", "policyd"))
    q = plugin.pf.submit(SENDER, ["bob@dane.test"], starttls=True, mail_options=["REQUIRETLS"])
    (d,) = plugin.wait_mx("dane")
    assert d.requiretls and d.tls
    log = plugin.log("milter")
    # every recipient goes to its MX: the strict smtp clone (policyd's strict zone), Postfix enforces
    assert f"{q.queue_id}: requiretls: class=requiretls, route=strict" in log
    assert "MAIL FROM REQUIRETLS" in log
    plugin.pf.wait_log(r"postfix/requiretls-strict/smtp\[\d+\]: .*to=<bob@dane\.test>"
                       r".*tls=dane-only/requiretls.*status=sent")


def test_preflight_reject_refuses_requiretls_to_an_unvalidated_mx_at_submission(plugin: Plugin) -> None:
    """Tell the user at once (550 5.7.10) instead of a bounce later; the local recipient is not checked."""
    plugin.table = "insecure.test requiretls=yes\n"
    plugin.policy = 'preflight = "reject"'
    plugin.start()
    with pytest.raises(smtplib.SMTPDataError) as exc:
        plugin.pf.submit(SENDER, [LOCAL, "bob@insecure.test"])
    assert exc.value.smtp_code == 550 and exc.value.smtp_error.startswith(b"5.7.10"), exc.value
    assert "pre-flight: REQUIRETLS delivery to insecure.test is not possible" in plugin.log("milter")
    _no_delivery(plugin.bed, "insecure", 1)


def test_preflight_probe_refuses_an_mx_without_requiretls_and_accepts_a_capable_one(plugin: Plugin) -> None:
    plugin.table = "dane-norequiretls.test requiretls=yes\ndane.test requiretls=yes\n"
    plugin.policy = 'preflight = "reject"'
    plugin.milter_extra = "preflight_probe = true"
    plugin.start()
    with pytest.raises(smtplib.SMTPDataError) as exc:
        plugin.pf.submit(SENDER, ["bob@dane-norequiretls.test"])
    assert exc.value.smtp_code == 550 and exc.value.smtp_error.startswith(b"5.7.30"), exc.value
    plugin.bed.mx("dane").clear()  # the probe's own connections are not deliveries, but start clean
    plugin.pf.submit(SENDER, ["bob@dane.test"])
    (d,) = plugin.wait_mx("dane")
    assert d.requiretls and d.tls
