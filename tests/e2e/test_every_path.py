"""REQUIRETLS on every path (issue 14): wherever Postfix itself routes a REQUIRETLS recipient (relayhost,
sender-dependent relayhost, transport_maps), the message either reaches that next hop with ``MAIL FROM ...
REQUIRETLS`` over verified TLS or bounces 5.7.30 / 5.7.10; it never leaves without REQUIRETLS.

Messages are tagged by a ``requiretls=yes`` destination rule.  On 3.7 and 3.10 the agent delivers to the next
hop the milter read from Postfix's own resolution (``X-RequireTLS-Nexthop``); on 3.11 it checks and re-injects,
and Postfix's native REQUIRETLS does the rest.
"""

from __future__ import annotations

import smtplib
import time

import pytest

from tests.e2e.plugin import Plugin
from tests.e2e.test_relay import SECRET, SENDER, _dsn, _message, _nothing_at, _status

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]


def _run(plugin: Plugin, table: str, **main_cf: str) -> None:
    plugin.table = table
    plugin.apply()
    plugin.pf.set(**main_cf)
    for daemon in ("milter", "relay", "policyd"):
        plugin.start_daemon(daemon)
    plugin.pf.start()


@pytest.mark.parametrize("relayhost", ["[mx.dane.test]:25", "[mx.dane.test]", "dane.test"])
def test_relayhost_only_in_main_cf_gets_requiretls(plugin: Plugin, relayhost: str) -> None:
    """relayhost in main.cf, not repeated in relay.relayhost: the milter reads it from Postfix's resolution.
    Unbracketed, it is an MX lookup (dane.test's MX is mx.dane.test, DNSSEC-signed, DANE)."""
    _run(plugin, "insecure.test requiretls=yes\n", relayhost=relayhost)
    plugin.pf.submit(SENDER, ["bob@insecure.test"], _message(["bob@insecure.test"]))
    d = next(x for x in plugin.wait_mx("dane", timeout=60) if "bob@insecure.test" in x.rcpt_tos)
    assert d.tls and d.requiretls, d.mail_options
    assert plugin.bed.mx("insecure").deliveries() == []


def test_relayhost_without_requiretls_bounces_5_7_30(plugin: Plugin) -> None:
    """(The DSN itself goes out through the same relayhost, as Postfix sends all mail there: it is looked for
    in the log, and the relay must never get the REQUIRETLS message itself.)"""
    _run(plugin, "insecure.test requiretls=yes\n", relayhost="[mx.dane-norequiretls.test]:25")
    plugin.pf.submit(SENDER, ["bob@insecure.test"], _message(["bob@insecure.test"]))
    plugin.pf.wait_log(r"to=<bob@insecure\.test>.*dsn=5\.7\.30, status=bounced", timeout=90)
    time.sleep(2)
    got = [d for d in plugin.bed.mx("dane-norequiretls").deliveries() if "bob@insecure.test" in d.rcpt_tos]
    assert got == []
    assert plugin.bed.mx("insecure").deliveries() == []


def test_transport_maps_next_hop_without_requiretls_bounces_5_7_30(plugin: Plugin) -> None:
    """The issue's case: a transport_maps route to an MX that does not offer REQUIRETLS was delivered over TLS
    without REQUIRETLS; it must bounce."""
    _run(plugin, "insecure.test requiretls=yes\n",
         transport_maps="inline:{insecure.test=smtp:[mx.dane-norequiretls.test]}")
    plugin.pf.submit(SENDER, ["bob@insecure.test"], _message(["bob@insecure.test"]))
    dsn = _dsn(plugin, timeout=90)
    assert _status(dsn.raw) == ["5.7.30"]
    _nothing_at(plugin, "dane-norequiretls")
    assert plugin.bed.mx("insecure").deliveries() == []


def test_transport_maps_next_hop_with_requiretls_is_used(plugin: Plugin) -> None:
    _run(plugin, "insecure.test requiretls=yes\n", transport_maps="inline:{insecure.test=relay:[mx.dane.test]}")
    plugin.pf.submit(SENDER, ["bob@insecure.test"], _message(["bob@insecure.test"]))
    d = next(x for x in plugin.wait_mx("dane", timeout=60) if "bob@insecure.test" in x.rcpt_tos)
    assert d.tls and d.requiretls
    assert plugin.bed.mx("insecure").deliveries() == []


def test_sender_dependent_relayhost_without_requiretls_bounces_and_the_mx_gets_nothing(plugin: Plugin) -> None:
    """The issue's case on 3.7: mail for a REQUIRETLS-capable domain went to the sender's relayhost (no
    REQUIRETLS) without REQUIRETLS, and the intended MX got nothing."""
    _run(plugin, "dane.test requiretls=yes\n",
         sender_dependent_relayhost_maps=f"inline:{{{SENDER}=[mx.dane-norequiretls.test]}}")
    plugin.pf.submit(SENDER, ["bob@dane.test"], _message(["bob@dane.test"]))
    dsn = _dsn(plugin, timeout=90)
    assert _status(dsn.raw) == ["5.7.30"]
    _nothing_at(plugin, "dane-norequiretls")
    assert plugin.bed.mx("dane").deliveries() == []


def test_lmtp_transport_not_declared_local_bounces_5_7_30(plugin: Plugin) -> None:
    """LMTP to elsewhere cannot carry REQUIRETLS on (lmtp_requiretls_policy is opportunistic even on 3.11)."""
    port = plugin.pf.ports.extra[3]
    _run(plugin, "insecure.test requiretls=yes\n",
         transport_maps=f"inline:{{insecure.test=lmtp:inet:127.0.0.1:{port}}}")
    q = plugin.pf.submit(SENDER, ["bob@insecure.test"], _message(["bob@insecure.test"]))
    dsn = _dsn(plugin, timeout=90)
    assert _status(dsn.raw) == ["5.7.30"]
    assert plugin.pf.find_log(rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{port}") is None, plugin.pf.log()[-2000:]
    assert "transport lmtp" in plugin.log("relay") or "lmtp" in dsn.raw.decode(errors="replace"), q


def test_discard_transport_is_handed_back_and_nothing_leaves(plugin: Plugin) -> None:
    _run(plugin, "insecure.test requiretls=yes\n", transport_maps="inline:{insecure.test=discard:}")
    q = plugin.pf.submit(SENDER, ["bob@insecure.test"], _message(["bob@insecure.test"]))
    plugin.pf.wait_log(r"to=<bob@insecure\.test>.*relay=none.*status=sent", timeout=60)
    plugin.pf.wait_queue_empty()
    time.sleep(1)
    assert plugin.bed.mx("insecure").deliveries() == []
    assert plugin.pf.find_log(r"status=bounced") is None, q


def test_local_alias_forwarding_keeps_requiretls(plugin: Plugin) -> None:
    """RFC 8689 section 4.1: a locally aliased message keeps its tag in every copy.  The alias expands to a
    DANE domain with REQUIRETLS (delivered with REQUIRETLS over verified TLS), one without (bounced 5.7.30,
    nothing at its MX) and a local mailbox (delivered there once).  On 3.7 and 3.10 Postfix's forwarded copy
    would skip every milter and header check and leave without REQUIRETLS; the local(8) clone sends it to the
    agent instead."""
    _run(plugin, "dane.test requiretls=yes\n",
         alias_maps="inline:{ { fwd = a1@dane.test, a2@dane-norequiretls.test, nobody } }")
    fwd = "fwd@postfix.local.test"
    plugin.pf.submit(SENDER, [fwd, "bob@dane.test"], _message([fwd, "bob@dane.test"]))
    got = plugin.wait_mx("dane", n=2, timeout=90)
    by_rcpt = {r: d for d in got for r in d.rcpt_tos}
    assert set(by_rcpt) == {"a1@dane.test", "bob@dane.test"}, [d.rcpt_tos for d in got]
    for d in got:
        assert d.tls and d.requiretls, (d.rcpt_tos, d.mail_options)
        assert b"X-RequireTLS" not in d.raw
    dsn = _dsn(plugin, timeout=90)
    assert _status(dsn.raw) == ["5.7.30"], dsn.raw.decode(errors="replace")[-1500:]
    _nothing_at(plugin, "dane-norequiretls")
    plugin.pf.wait_queue_empty(60)
    mbox = (plugin.pf.dir / "mail" / "nobody").read_text(errors="replace")
    assert mbox.count(SECRET) == 1
    assert len(plugin.bed.mx("dane").deliveries()) == 2


@pytest.mark.parametrize(("domain", "delivered"), [("signed.test", True), ("sts.test", True),
                                                   ("sts-testing.test", False)])
@pytest.mark.parametrize("tag", ["rule", "native"])
def test_pkix_and_mta_sts_destinations(plugin: Plugin, domain: str, delivered: bool, tag: str) -> None:
    """RFC 8689 section 4.2.1: a DNSSEC-validated MX with a PKIX certificate and no TLSA (signed.test) and an
    MTA-STS enforce MX (sts.test) qualify; an MTA-STS testing policy validates nothing (RFC 8461 section 5):
    5.7.10 at once, nothing at the MX.  Postfix 3.11 used to refuse signed.test (its TLS policy said ``may``);
    the strict clone now gives it ``secure match=hostname``.  ``native``: MAIL FROM REQUIRETLS, 3.11 only."""
    if tag == "native" and plugin.pf.version != "3.11":
        pytest.skip("MAIL FROM REQUIRETLS is received natively from Postfix 3.11 on")
    key = domain.removesuffix(".test")
    rcpt = f"bob@{domain}"
    _run(plugin, f"{domain} requiretls=yes\n" if tag == "rule" else "")
    start = time.monotonic()
    if tag == "native":
        plugin.pf.submit(SENDER, [rcpt], _message([rcpt]), starttls=True, mail_options=["REQUIRETLS"])
    else:
        plugin.pf.submit(SENDER, [rcpt], _message([rcpt]))
    if delivered:
        (d,) = plugin.wait_mx(key, timeout=60)
        assert d.tls and d.requiretls, d.mail_options
        if plugin.pf.version == "3.11":
            plugin.pf.wait_log(rf"to=<{rcpt}>.*relay=mx\.{key}\.test.*tls=(secure|verify)/requiretls.*status=sent")
        return
    dsn = _dsn(plugin, timeout=60)
    assert _status(dsn.raw) == ["5.7.10"], dsn.raw.decode(errors="replace")[-1500:]
    assert time.monotonic() - start < 45  # one queue run, not days of deferral
    _nothing_at(plugin, key)


def test_virtual_alias_expansions_keep_requiretls_and_local_targets_are_delivered_here(plugin: Plugin) -> None:
    """cleanup expands virtual aliases after the milter saw the message: the agent gets recipients nobody
    planned.  A remote one goes to its MX with REQUIRETLS; one in ``relay.local_domains`` is handed back and
    delivered here (before, it was sent to its domain's MX and bounced)."""
    plugin.relay_extra = 'local_domains = ["postfix.local.test"]'
    _run(plugin, "virt.test requiretls=yes\n", virtual_alias_domains="virt.test",
         virtual_alias_maps="inline:{ {va@virt.test = vb@dane.test}, {vl@virt.test = nobody@postfix.local.test} }")
    rcpts = ["va@virt.test", "vl@virt.test"]
    plugin.pf.submit(SENDER, rcpts, _message(rcpts))
    (d,) = plugin.wait_mx("dane", timeout=60)
    assert d.rcpt_tos == ("vb@dane.test",) and d.tls and d.requiretls, d.mail_options
    plugin.pf.wait_log(r"to=<nobody@postfix\.local\.test>.*status=sent", timeout=60)
    plugin.pf.wait_queue_empty(60)
    assert plugin.pf.find_log(r"status=bounced") is None, plugin.pf.log()[-2000:]
    mbox = (plugin.pf.dir / "mail" / "nobody").read_text(errors="replace")
    assert mbox.count(SECRET) == 1


def test_dot_forward_copy_keeps_requiretls(plugin: Plugin) -> None:
    """The same for a user's .forward (``forward_path`` points at a file the test writes for ``nobody``): the
    off-site copy carries REQUIRETLS over verified TLS, ``\\nobody`` keeps one in the mailbox."""
    fwd_dir = plugin.pf.dir / "forward"
    fwd_dir.mkdir(exist_ok=True)
    (fwd_dir / "nobody").write_text("fwd1@dane.test, \\nobody\n")
    fwd_dir.chmod(0o755)
    (fwd_dir / "nobody").chmod(0o644)
    _run(plugin, "postfix.local.test requiretls=yes\n", forward_path=f"{fwd_dir}/$user")
    plugin.pf.submit(SENDER, ["nobody@postfix.local.test"], _message(["nobody@postfix.local.test"]))
    (d,) = plugin.wait_mx("dane", timeout=90)
    assert d.rcpt_tos == ("fwd1@dane.test",) and d.tls and d.requiretls, (d.rcpt_tos, d.mail_options)
    plugin.pf.wait_queue_empty(60)
    assert plugin.pf.find_log(r"status=bounced") is None, plugin.pf.log()[-2000:]
    mbox = (plugin.pf.dir / "mail" / "nobody").read_text(errors="replace")
    assert mbox.count(SECRET) == 1


def test_error_transport_is_refused_at_rcpt_and_nothing_leaves(plugin: Plugin) -> None:
    """An ``error:`` transport_maps entry: smtpd refuses the recipient before any milter runs."""
    _run(plugin, "insecure.test requiretls=yes\n", transport_maps="inline:{insecure.test=error:5.1.1 gone}")
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        plugin.pf.submit(SENDER, ["bob@insecure.test"], _message(["bob@insecure.test"]))
    _nothing_at(plugin, "insecure")
