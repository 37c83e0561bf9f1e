"""``requiretls check``: output, verdict line and exit status (0 possible, 1 not, 2 lookup error)."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from requiretls import check
from requiretls.dest.dane import make_tlsa

from .support import FakeDns, HttpAnswer, Issued, PolicyServer, SmtpServer, TestCA, policy_text, server_context


def _run(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    args = parser.parse_args(list(argv))
    out = io.StringIO()
    code = check.run(args, out)
    return code, out.getvalue()


@pytest.fixture
def mx_leaf(ca: TestCA) -> Issued:
    return ca.leaf("mx.good.test", "mx.sts.test")


@pytest.fixture
def smtp(mx_leaf: Issued, tmp_path: Path) -> Iterator[SmtpServer]:
    srv = SmtpServer(server_context(tmp_path, mx_leaf), requiretls=True)
    yield srv
    srv.close()


def _common(fake_dns: FakeDns, *extra: str) -> list[str]:
    return ["--resolver", f"127.0.0.1:{fake_dns.port}", "--timeout", "0.5", *extra]


def test_dane_destination_with_requiretls_is_possible(fake_dns: FakeDns, smtp: SmtpServer, mx_leaf: Issued) -> None:
    fake_dns.add("good.test", "MX", "10 mx.good.test.")
    fake_dns.host("mx.good.test")
    fake_dns.add("_25._tcp.mx.good.test", "TLSA", make_tlsa(mx_leaf.der).to_text())
    code, text = _run("good.test", "--probe", "--smtp-port", str(smtp.port), *_common(fake_dns))
    assert code == 0, text
    assert "DNSSEC secure" in text
    assert "3 1 1 " in text and "usable" in text
    assert "certificate dane verified" in text
    assert text.strip().splitlines()[-1].startswith("REQUIRETLS delivery possible: yes — mx.good.test")


def test_without_probe_the_verdict_says_what_was_not_checked(fake_dns: FakeDns) -> None:
    fake_dns.add("good.test", "MX", "10 mx.good.test.")
    fake_dns.host("mx.good.test")
    code, text = _run("good.test", *_common(fake_dns))
    assert code == 0
    assert "not probed (use --probe)" in text


def test_server_without_requiretls_gives_exit_1_and_5_7_30(fake_dns: FakeDns, mx_leaf: Issued, tmp_path: Path,
                                                          cafile: str) -> None:
    srv = SmtpServer(server_context(tmp_path, mx_leaf), requiretls=False)
    try:
        fake_dns.add("good.test", "MX", "10 mx.good.test.")
        fake_dns.host("mx.good.test")
        code, text = _run("good.test", "--probe", "--smtp-port", str(srv.port), "--cafile", cafile,
                          *_common(fake_dns))
    finally:
        srv.close()
    assert code == 1
    assert "REQUIRETLS NOT advertised" in text
    assert "REQUIRETLS delivery possible: no" in text and "[5.7.30]" in text


def test_insecure_mx_without_sts_is_not_possible(fake_dns: FakeDns) -> None:
    fake_dns.add("plain.test", "MX", "10 mx.plain.test.", ad=False)
    fake_dns.host("mx.plain.test", ad=False)
    code, text = _run("plain.test", *_common(fake_dns))
    assert code == 1
    assert "no MX host is DNSSEC-validated or listed by an MTA-STS policy" in text


def test_insecure_mx_with_sts_enforce_is_possible(fake_dns: FakeDns, policy_server: PolicyServer, smtp: SmtpServer,
                                                  ca: TestCA, cafile: str, tmp_path: Path) -> None:
    """RFC 8689 section 4.2.1 step 2 with RFC 8461 section 4.1: an unsigned MX validated by MTA-STS."""
    fake_dns.add("sts.test", "MX", "10 mx.sts.test.", ad=False)
    fake_dns.host("mx.sts.test", ad=False)
    fake_dns.add("_mta-sts.sts.test", "TXT", '"v=STSv1; id=1"', ad=False)
    fake_dns.host("mta-sts.sts.test", ad=False)
    policy_server.contexts["mta-sts.sts.test"] = server_context(tmp_path, ca.leaf("mta-sts.sts.test"))
    policy_server.answers["mta-sts.sts.test"] = HttpAnswer(body=policy_text(mx=("mx.sts.test",)))
    code, text = _run("sts.test", "--json", "--probe", "--cafile", cafile, "--smtp-port", str(smtp.port),
                      "--https-port", str(policy_server.port), *_common(fake_dns))
    doc = json.loads(text)
    assert doc["mta_sts"]["status"] == "fetched", doc["mta_sts"]
    assert code == 0, doc["verdict"]
    assert doc["requirement"] == "sts-enforce"
    assert doc["hosts"][0]["requiretls_candidate"] is True
    assert doc["hosts"][0]["probe"]["verification"] == "pkix"
    assert doc["verdict"]["line"].startswith("REQUIRETLS delivery possible: yes")


def test_bogus_mx_is_a_lookup_error(fake_dns: FakeDns) -> None:
    fake_dns.servfail("bogus.test", "MX", ede=6)
    code, text = _run("bogus.test", *_common(fake_dns))
    assert code == 2
    assert "MX: error, DNSSEC bogus" in text
    assert "REQUIRETLS delivery possible: no — lookup error" in text


def test_unreachable_resolver_is_a_lookup_error(fake_dns: FakeDns) -> None:
    fake_dns.drop("slow.test", "MX")
    code, _ = _run("slow.test", *_common(fake_dns))
    assert code == 2


def test_bad_arguments_exit_2() -> None:
    assert _run("good.test", "--resolver", "not-an-ip")[0] == 2
    assert _run("a..b", "--resolver", "127.0.0.1:1")[0] == 2


def test_resolver_argument_forms() -> None:
    assert check.parse_resolver("127.0.0.1") == ("127.0.0.1", 53)
    assert check.parse_resolver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert check.parse_resolver("::1") == ("::1", 53)
    assert check.parse_resolver("[::1]:5353") == ("::1", 5353)
    with pytest.raises(ValueError):
        check.parse_resolver("127.0.0.1:0")


def test_cli_offers_the_check_subcommand(fake_dns: FakeDns, capsys: pytest.CaptureFixture[str]) -> None:
    from requiretls.cli import main

    fake_dns.add("null.test", "MX", "0 .")
    code = main(["check", "null.test", *_common(fake_dns)])
    assert code == 1
    assert "null MX" in capsys.readouterr().out
