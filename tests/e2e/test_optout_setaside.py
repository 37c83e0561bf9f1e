"""What an opt-out set aside, per message (issue 18), through real Postfix and the real milter: a
``TLS-Required: No`` message to a DANE domain, an MTA-STS domain and a domain with neither gets one
``optout_set_aside=`` line naming the first two."""

from __future__ import annotations

import time

import pytest

from tests.e2e.plugin import Plugin

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]


def test_one_log_line_names_the_dane_and_mta_sts_policies_set_aside(plugin: Plugin) -> None:
    plugin.apply()
    for d in ("milter", "relay", "policyd"):
        plugin.start_daemon(d)
    plugin.pf.start()
    q = plugin.pf.submit("alice@sender.test", ["bob@dane.test", "carol@sts.test", "dave@insecure.test"],
                         headers={"TLS-Required": "No"})
    plugin.wait_mx("insecure", timeout=60)
    deadline = time.monotonic() + 30
    lines: list[str] = []
    while time.monotonic() < deadline and not lines:
        # (the instance's milter.log outlives a session: only this message's lines)
        lines = [ln for ln in plugin.log("milter").splitlines() if f"{q.queue_id}: requiretls: optout_set_aside=" in ln]
        time.sleep(0.2)
    time.sleep(1)  # one line per message, not one per recipient: a second one would show by now
    lines = [ln for ln in plugin.log("milter").splitlines() if f"{q.queue_id}: requiretls: optout_set_aside=" in ln]
    assert len(lines) == 1, plugin.log("milter")[-3000:]
    assert "dane.test=dane" in lines[0] and "sts.test=mta-sts" in lines[0] and "insecure.test" not in lines[0]
