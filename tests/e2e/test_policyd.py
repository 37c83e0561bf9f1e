"""policyd against the real testbed (issue 5): Postfix's own socketmap client (postmap -q) for every zone, and
Postfix's smtp client delivering to an MTA-STS domain through the ``default`` zone."""

from __future__ import annotations

import subprocess

import pytest

from tests.e2e.plugin import Plugin
from tests.testbed.postfix import Postfix

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]

TABLE = "tabled.test dane-only optout=no\ninsecure.test encrypt\nplain.test optout=no\n"

# (key, zone, expected): an answer string, None for NOTFOUND, "TEMP" for a temporary error.
EXPECTED = [
    ("dane.test", "default", "dane-only"),
    ("sts.test", "default", "secure match=mx.sts.test servername=hostname"),
    ("sts-testing.test", "default", None),
    ("signed.test", "default", None),
    ("insecure.test", "default", "encrypt"),
    ("tabled.test", "default", "dane-only"),
    ("bogus.test", "default", "TEMP"),
    ("servfail.test", "default", "TEMP"),
    ("sts-badcert.test", "default", None),  # fetch failed, nothing cached: no policy (RFC 8461 §5)
    ("sts-wrongmx.test", "default", "secure match=mx.elsewhere.test servername=hostname"),
    ("dane.test", "relaxed", "may"),
    ("sts.test", "relaxed", "may"),
    ("tabled.test", "relaxed", "dane-only"),
    ("plain.test", "relaxed", None),  # optout=no, normal policy: nothing published
    ("dane.test", "strict", "dane-only"),
    ("sts.test", "strict", "secure match=mx.sts.test servername=hostname"),
    # RFC 8461 §5: a testing policy validates no MX for REQUIRETLS (the one eligibility verdict): encrypt,
    # which 3.11 refuses for REQUIRETLS with 5.7.10 at once; never may, never days of TEMP
    ("sts-testing.test", "strict", "encrypt"),
    ("signed.test", "strict", "secure match=hostname"),
    ("plain.test", "strict", "encrypt"),
    ("bogus.test", "strict", "TEMP"),
    ("dane.test", "requiretls", "enforce"),
]


@pytest.fixture
def plugin(plugin: Plugin) -> Plugin:
    plugin.table = TABLE
    return plugin


def _postfix_with_default_zone(plugin: Plugin) -> None:
    """Postfix's own smtp client asks policyd's ``default`` zone for every next hop."""
    plugin.write_config()
    plugin.start_daemon("policyd")
    plugin.pf.set(smtp_tls_policy_maps=f"socketmap:unix:{plugin.policyd_sock}:default")
    plugin.pf.start()


def _postmap(pf: Postfix, sock: str, key: str, zone: str) -> tuple[int, str]:
    # The host's postmap (3.7) is Postfix's socketmap client; the daemon is the same for every version.
    r = subprocess.run(["postmap", "-c", str(pf.config_dir), "-q", key, f"socketmap:unix:{sock}:{zone}"],
                       capture_output=True, text=True, timeout=60)
    return r.returncode, (r.stdout.strip() or r.stderr.strip())


def test_postmap_answers_every_zone(plugin: Plugin) -> None:
    if plugin.pf.version != "3.7":
        pytest.skip("postmap runs on the host (3.7); the daemon does not depend on the Postfix version")
    plugin.write_config()
    plugin.start_daemon("policyd")
    got = []
    for key, zone, want in EXPECTED:
        rc, out = _postmap(plugin.pf, str(plugin.policyd_sock), key, zone)
        if want is None:
            ok = rc == 1 and out == ""
        elif want == "TEMP":
            ok = rc != 0 and "temporary error" in out
        else:
            ok = rc == 0 and out == want
        got.append((key, zone, want, ok, rc, out))
    bad = [g for g in got if not g[3]]
    assert not bad, bad


def test_smtp_client_uses_the_default_zone_to_verify_an_mta_sts_mx(plugin: Plugin) -> None:
    """smtp_tls_policy_maps = the policy service: MTA-STS enforce -> verified certificate (RFC 8461 §4.2)."""
    _postfix_with_default_zone(plugin)
    q = plugin.pf.submit("alice@sender.test", ["bob@sts.test"])
    (d,) = plugin.wait_mx("sts")
    assert d.tls
    plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@sts.test>.*status=sent")
    assert plugin.pf.find_log(r"Verified TLS connection established to mx\.sts\.test") is not None


def test_smtp_client_refuses_the_mx_that_is_not_in_the_mta_sts_policy(plugin: Plugin) -> None:
    """RFC 8461 §4.1: an MX the policy does not list is not used: deferred, never sent."""
    _postfix_with_default_zone(plugin)
    q = plugin.pf.submit("alice@sender.test", ["bob@sts-wrongmx.test"])
    m = plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@sts-wrongmx.test>.*status=deferred")
    assert "not verified" in m.line or "verification failed" in m.line, m.line
    assert plugin.bed.mx("sts-wrongmx").deliveries() == []


def test_smtp_client_refuses_an_mta_sts_mx_whose_certificate_fails(plugin: Plugin) -> None:
    """The same through the default zone for a domain whose MX certificate has expired: deferred, never sent."""
    _postfix_with_default_zone(plugin)
    q = plugin.pf.submit("alice@sender.test", ["bob@expired.test"])
    plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@expired.test>.*status=deferred")
    assert plugin.bed.mx("expired").deliveries() == []
