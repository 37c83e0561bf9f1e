"""``requiretls check`` asks its resolver for a name that must validate first (issue 18): a resolver that
answers without the AD bit gets a loud warning and exit status 2, before any lookup could mislead."""

from __future__ import annotations

import argparse
import io
from typing import Any

import pytest

from requiretls import check

from .support import FakeDns


def _run(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    out = io.StringIO()
    return check.run(parser.parse_args(list(argv)), out), out.getvalue()


def test_a_resolver_that_does_not_validate_is_a_warning_and_exit_2(fake_dns: FakeDns,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    fake_dns.empty(".", "DNSKEY", ad=False)  # answers, but without AD: a forwarder or a non-validating cache
    fake_dns.add("good.test", "MX", "10 mx.good.test.")
    code, out = _run("good.test", "--resolver", f"127.0.0.1:{fake_dns.port}", "--timeout", "0.5")
    err = capsys.readouterr().err
    assert code == 2 and out == ""
    assert "WARNING" in err and "does not validate" in err and "root DNSKEY" in err, err
    assert ("good.test", "MX") not in fake_dns.queries  # nothing looked up through it


def test_the_check_name_is_configurable(fake_dns: FakeDns, capsys: pytest.CaptureFixture[str]) -> None:
    fake_dns.empty(".", "DNSKEY", ad=False)  # the root would fail the check ...
    fake_dns.empty("signed.example", "DNSKEY", ad=True)  # ... but the admin's own signed zone validates
    fake_dns.add("good.test", "MX", "10 mx.good.test.")
    fake_dns.host("mx.good.test")
    code, _ = _run("good.test", "--resolver", f"127.0.0.1:{fake_dns.port}", "--timeout", "0.5",
                   "--check-name", "signed.example")
    assert code == 0, capsys.readouterr().err
    assert ("signed.example", "DNSKEY") in fake_dns.queries and ("", "DNSKEY") not in fake_dns.queries
    fake_dns.empty("unsigned.example", "DNSKEY", ad=False)
    code, _ = _run("good.test", "--resolver", f"127.0.0.1:{fake_dns.port}", "--timeout", "0.5",
                   "--check-name", "unsigned.example")
    assert code == 2 and "unsigned.example DNSKEY answer came without the AD bit" in capsys.readouterr().err


@pytest.mark.testbed
def test_the_testbeds_authoritative_server_is_no_validating_resolver(bed: Any,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The bed's NSD serves the test root zone but validates nothing: the check says so (exit 2); the bed's
    Unbound validates: the same check passes."""
    from tests.testbed.hosts import NSD_IP, UNBOUND_IP

    code, out = _run("dane.test", "--resolver", NSD_IP)
    err = capsys.readouterr().err
    assert code == 2 and "WARNING" in err and f"resolver {NSD_IP}:53 does not validate" in err, err
    code, out = _run("dane.test", "--resolver", UNBOUND_IP)
    assert code == 0, (out, capsys.readouterr().err)
