"""MTA-STS ``mx`` patterns enforced exactly (RFC 8461 section 4.1) and Postfix 3.10+'s TLSRPT policy attributes
(issue 18), through each Postfix version's own socketmap client and smtp client.

``sts-wild.test``: policy ``mx: *.sts-wild.test``, MX ``mx.sts-wild.test`` (one label below: allowed).
``sts-deep.test``: policy ``mx: *.sts-deep.test``, MX ``a.b.sts-deep.test`` (two labels below: refused), with a
certificate valid for its own name, so that only the pattern can refuse it.
"""

from __future__ import annotations

import pytest

from tests.e2e.plugin import Plugin

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]


def _modern(plugin: Plugin) -> bool:
    major, minor = (int(x) for x in plugin.pf.version.split(".")[:2])
    return (major, minor) >= (3, 10)


def _map(plugin: Plugin) -> str:
    """The map name ``postfix-config`` writes for this version."""
    return f"socketmap:unix:{plugin.policyd_sock}:default{'+tlsrpt' if _modern(plugin) else ''}"


def _wire(plugin: Plugin) -> None:
    plugin.write_config()
    plugin.start_daemon("policyd")
    settings = {"smtp_tls_policy_maps": _map(plugin)}
    if _modern(plugin):
        # Postfix >= 3.10.5 (both chroots are newer): connect only to MX hosts the STS patterns allow.
        settings["smtp_tls_enforce_sts_mx_patterns"] = "yes"
    plugin.pf.set(**settings)
    plugin.pf.start()


def test_postmap_shows_the_answer_for_this_version(plugin: Plugin) -> None:
    """This version's own postmap (its socketmap client) reads the answer; 3.10+ get the TLSRPT attributes,
    3.7 the plain answer (the attributes would break it)."""
    plugin.write_config()
    plugin.start_daemon("policyd")
    r = plugin.pf.run(["postmap", "-c", str(plugin.pf.config_dir), "-q", "sts-wild.test", _map(plugin)],
                      check=False)
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    assert out.startswith("secure match=mx.sts-wild.test servername=hostname"), out
    if _modern(plugin):
        for part in ("policy_type=sts", "policy_domain=sts-wild.test", "mx_host_pattern=*.sts-wild.test",
                     "{ policy_string = version: STSv1 }", "{ policy_string = mode: enforce }",
                     "{ policy_string = mx: *.sts-wild.test }", "{ policy_string = max_age: 86400 }"):
            assert part in out, (part, out)
    else:
        assert "policy_" not in out and "mx_host_pattern" not in out, out
    # The MX two labels below the wildcard is in no answer: nothing of this domain may be used.
    r = plugin.pf.run(["postmap", "-c", str(plugin.pf.config_dir), "-q", "sts-deep.test", _map(plugin)],
                      check=False)
    assert r.returncode != 0 and "temporary error" in (r.stdout + r.stderr), (r.returncode, r.stdout, r.stderr)


def test_mx_one_label_below_the_wildcard_is_delivered(plugin: Plugin) -> None:
    _wire(plugin)
    q = plugin.pf.submit("alice@sender.test", ["bob@sts-wild.test"])
    (d,) = plugin.wait_mx("sts-wild")
    assert d.tls
    plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@sts-wild.test>.*status=sent")
    assert plugin.pf.find_log(r"Verified TLS connection established to mx\.sts-wild\.test") is not None
    if _modern(plugin):
        # Postfix read the attributes: no complaint about them in its log.
        assert plugin.pf.find_log(r"invalid attribute|unexpected attribute") is None


def test_mx_two_labels_below_the_wildcard_is_refused(plugin: Plugin) -> None:
    """RFC 8461 section 4.1: ``*.sts-deep.test`` does not allow ``a.b.sts-deep.test``, although its certificate
    is valid for that name: deferred, never sent (3.7: through our answer alone)."""
    _wire(plugin)
    q = plugin.pf.submit("alice@sender.test", ["bob@sts-deep.test"])
    m = plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@sts-deep.test>.*status=deferred")
    assert "dsn=4.7.5" in m.line, m.line
    # policyd's TEMP ("no MX host matches the MTA-STS policy's mx patterns"): Postfix defers before connecting
    assert plugin.pf.find_log(r"TLS policy lookup for sts-deep\.test/a\.b\.sts-deep\.test") is not None
    assert plugin.bed.mx("sts-deep").deliveries() == []


def test_the_allowed_mx_gets_the_mail_the_deep_one_does_not(plugin: Plugin) -> None:
    """``sts-mixed.test``: the preferred MX ``a.b.sts-mixed.test`` is two labels below ``*.sts-mixed.test``, the
    second ``mx.sts-mixed.test`` one label: the mail goes to the second only.  Our answer lists only the
    allowed MX (3.7: the deep MX's certificate is refused); 3.10+ with the attributes and
    smtp_tls_enforce_sts_mx_patterns do not even connect to the deep MX."""
    _wire(plugin)
    q = plugin.pf.submit("alice@sender.test", ["bob@sts-mixed.test"])
    (d,) = plugin.wait_mx("sts-mixed")
    assert d.tls
    plugin.pf.wait_log(rf"{q.queue_id}: to=<bob@sts-mixed.test>, relay=mx\.sts-mixed\.test.*status=sent")
    assert plugin.bed.mx("sts-mixed-deep").deliveries() == []
    deep_tls = plugin.pf.find_log(r"a\.b\.sts-mixed\.test\[127\.0\.2\.29\]:25.*(certificate|TLS)")
    if _modern(plugin):
        assert deep_tls is None, deep_tls.line if deep_tls else ""
    else:
        assert deep_tls is not None  # tried, and its certificate refused
