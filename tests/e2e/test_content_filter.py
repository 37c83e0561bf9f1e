"""Coexistence with a content filter (issue 15): the admin has an amavis-style ``content_filter`` (an SMTP
filter on a loopback port that hands mail back to a loopback smtpd with ``-o content_filter=``) before wiring
requiretls in.  Every message of every class must pass the filter exactly once, keep its class after it, and
nothing may be delivered unfiltered.

The filter here is a small SMTP server in the test that adds ``X-Test-Filtered`` and re-injects into the
return port, as amavisd-new does (amavisd-new itself is not installed by the testbed).
"""

from __future__ import annotations

import smtplib
import threading
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from tests.e2e.plugin import Plugin

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]

SENDER = "alice@sender.test"
MARK = "X-Test-Filtered"


class ReinjectingFilter:
    """Receives from Postfix's content_filter transport; adds MARK; sends back to the return port."""

    def __init__(self, return_port: int) -> None:
        self.return_port = return_port
        self.seen: list[str] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data = envelope.content if isinstance(envelope.content, bytes) else envelope.content.encode()
        with self.lock:
            self.seen.append(envelope.mail_from)
        try:
            with smtplib.SMTP("127.0.0.1", self.return_port, timeout=30) as s:
                s.sendmail(envelope.mail_from, envelope.rcpt_tos, f"{MARK}: yes\r\n".encode() + data)
        except smtplib.SMTPException as e:
            return f"451 4.3.0 re-injection failed: {e}"
        return "250 2.0.0 filtered and re-injected"


@pytest.fixture
def filtered(plugin: Plugin) -> Any:
    """The admin's content filter, configured before requiretls's --apply."""
    pf = plugin.pf
    filter_port, return_port = pf.ports.extra[1], pf.ports.extra[2]
    handler = ReinjectingFilter(return_port)
    ctl = Controller(handler, hostname="127.0.0.1", port=filter_port)
    ctl.start()
    pf.set(content_filter=f"testfilter:[127.0.0.1]:{filter_port}")
    pf.add_service("testfilter", "unix", "unix - - n - 2 smtp -o smtp_tls_security_level=none "
                   "-o smtp_tls_policy_maps= -o smtp_send_xforward_command=no")
    pf.add_service(f"127.0.0.1:{return_port}", "inet",
                   "inet n - n - - smtpd -o content_filter= -o mynetworks=127.0.0.0/8 "
                   "-o smtpd_recipient_restrictions=permit_mynetworks,reject "
                   "-o receive_override_options=no_header_body_checks,no_unknown_recipient_checks")
    try:
        yield handler
    finally:
        ctl.stop()


def _start(plugin: Plugin, table: str) -> None:
    plugin.table = table
    plugin.apply()
    for d in ("milter", "relay", "policyd"):
        plugin.start_daemon(d)
    plugin.pf.start()


def test_every_class_passes_the_filter_once_and_keeps_its_class(plugin: Plugin, filtered: ReinjectingFilter) -> None:
    _start(plugin, "dane.test requiretls=yes\n")
    # the route header does not FILTER on the way in (that would override content_filter)
    assert "milter_header_checks" not in plugin.pf.postconf("-n")
    # normal: opportunistic TLS to an MX without DANE
    plugin.pf.submit(SENDER, ["bob@insecure.test"])
    # opt-out (TLS-Required: No from a trusted client) to a DANE domain whose MX has no STARTTLS: only the
    # relaxed route delivers it; had it lost its class in the filter, it would be deferred
    plugin.pf.submit(SENDER, ["bob@dane-nostarttls.test"], headers={"TLS-Required": "No"})
    # REQUIRETLS by a destination rule: reaches the MX with MAIL FROM REQUIRETLS
    plugin.pf.submit(SENDER, ["carol@dane.test"])

    (normal,) = plugin.wait_mx("insecure", timeout=60)
    (optout,) = plugin.wait_mx("dane-nostarttls", timeout=60)
    (rtls,) = plugin.wait_mx("dane", timeout=60)
    for d in (normal, optout, rtls):
        assert d.message.get_all(MARK) == ["yes"], (d.rcpt_tos, d.message.get_all(MARK))
        assert "X-RequireTLS-Route" not in d.message
    assert optout.tls is False and optout.message["TLS-Required"] == "No"
    assert rtls.tls and rtls.requiretls, rtls.mail_options
    assert len(filtered.seen) == 3, filtered.seen
    log = plugin.pf.log()
    assert "requiretls-filter-cleanup" in log
