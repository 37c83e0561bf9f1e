"""Doubt defers, everywhere the eligibility verdict is asked (issue 13): an MTA-STS policy host that does not
answer in time, with no policy cached, is lookup trouble, never a 5.7.10.

``sts-stall.test`` has an unsigned MX that only its MTA-STS policy (enforce) validates; ``Bed.sts_stall`` makes
the policy host hold the request unanswered, so every fetch times out (``fetch_timeout = 5`` here).
"""

from __future__ import annotations

import argparse
import io
import time

import pytest

from requiretls import check
from tests.e2e.plugin import Plugin
from tests.testbed.hosts import UNBOUND_IP

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]

SENDER = "alice@sender.test"
RCPT = "bob@sts-stall.test"


def _check(plugin: Plugin) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    args = parser.parse_args([RCPT.split("@")[1], "--resolver", f"{UNBOUND_IP}:53", "--cafile",
                              str(plugin.bed.pki.ca_cert), "--fetch-timeout", "2"])
    out = io.StringIO()
    return check.run(args, out), out.getvalue()


def test_mta_sts_fetch_timeout_defers_and_delivers_once_the_policy_host_answers(plugin: Plugin) -> None:
    plugin.table = "sts-stall.test requiretls=yes\n"
    plugin.policy = 'preflight = "reject"'  # pre-flight must accept under doubt, not refuse
    plugin.mta_sts_extra = "retry_after_failure = 1"
    plugin.start()
    with plugin.bed.sts_stall("sts-stall.test"):
        code, text = _check(plugin)
        assert code == check.EXIT_LOOKUP_ERROR, text
        verdict = text.strip().splitlines()[-1]
        assert verdict.startswith("REQUIRETLS delivery possible: no — lookup error, try later: MX not "
                                  "DNSSEC-signed and its MTA-STS policy could not be learnt now"), text
        assert verdict.endswith("[4.4.3]"), text

        # Accepted (submit raises on a refusal): the pre-flight's verdict is "unknown", not "impossible".
        q = plugin.pf.submit(SENDER, [RCPT], f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: stall\r\n\r\nbody\r\n")
        line = plugin.pf.wait_log(rf"{q.queue_id}: to=<{RCPT}>.*status=deferred", timeout=90).line
        assert "dsn=4." in line, line
        assert plugin.pf.find_log(rf"{q.queue_id}: .*(dsn=5\.|status=bounced)") is None, plugin.pf.log()[-3000:]
        assert plugin.bed.mx("sts-stall").deliveries() == []
        assert "pre-flight: REQUIRETLS delivery to sts-stall.test" not in plugin.log("milter")
    time.sleep(1.5)  # past retry_after_failure
    plugin.pf.flush()
    (d,) = plugin.wait_mx("sts-stall", timeout=90)
    assert d.tls and d.requiretls, d.mail_options
    plugin.pf.wait_queue_empty(60)
    assert len(plugin.bed.mx("sts-stall").deliveries()) == 1
    assert plugin.pf.find_log(r"status=bounced") is None
