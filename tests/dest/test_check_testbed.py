"""``requiretls check`` against the real testbed: NSD + validating Unbound with signed, unsigned,
bogus and lame zones, the test CA, aiosmtpd MXs, and the MTA-STS HTTPS server.

Uses the session's ``bed`` fixture (tests/conftest.py): a running bed, or one started for the session.
"""

from __future__ import annotations

import argparse
import io
from typing import Any

import pytest

from requiretls import check
from requiretls.dest.dnssec import DnsClient, ResolverSettings
from requiretls.dest.errors import (
    MtaStsMediaTypeError,
    MtaStsRedirectError,
    MtaStsTlsError,
    MtaStsTooLargeError,
)
from requiretls.dest.mtasts import StsResolver, StsSettings, StsStatus

from .support import run

pytestmark = pytest.mark.testbed

RESOLVER = "127.0.53.53"


@pytest.fixture(scope="module")
def bed_ca(bed: Any) -> str:
    """The CA file of the session's testbed (``bed`` fixture of tests/conftest.py)."""
    return str(bed.pki.ca_cert)


def _check(ca: str, domain: str, *extra: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    args = parser.parse_args(
        [
            domain,
            "--resolver",
            RESOLVER,
            "--cafile",
            ca,
            "--probe-timeout",
            "10",
            "--fetch-timeout",
            "10",
            *extra,
        ]
    )
    out = io.StringIO()
    return check.run(args, out), out.getvalue()


# (zone, exit status, text in the verdict line, enhanced status or MX named in it)
CASES: list[tuple[str, int, str, str]] = [
    ("dane.test", 0, "mx.dane.test is DNSSEC-validated, dane-verified", ""),
    ("dane-norequiretls.test", 1, "no validated MX advertises REQUIRETLS", "[5.7.30]"),
    ("signed.test", 0, "mx.signed.test is DNSSEC-validated, pkix-verified", ""),
    ("insecure.test", 1, "no MX host is DNSSEC-validated or listed by an MTA-STS policy", "[5.7.10]"),
    ("insecure-norequiretls.test", 1, "no MX host is DNSSEC-validated", "[5.7.10]"),
    ("sts.test", 0, "mx.sts.test is MTA-STS-validated, pkix-verified", ""),
    ("sts-norequiretls.test", 1, "no validated MX advertises REQUIRETLS", "[5.7.30]"),
    # RFC 8461 section 5: a testing policy only asks for reports; it validates no MX for REQUIRETLS.
    ("sts-testing.test", 1, "no MX host is DNSSEC-validated or listed by an MTA-STS policy in enforce mode "
     "(MTA-STS mode is testing)", "[5.7.10]"),
    ("bogus.test", 2, "lookup error, try later: MX lookup bogus", "[4.4.3]"),
    ("servfail.test", 2, "lookup error, try later: MX lookup indeterminate", "[4.4.3]"),
    ("expired.test", 1, "no validated MX offers authenticated TLS", "[5.7.10]"),
    ("wrongname.test", 1, "no validated MX offers authenticated TLS", "[5.7.10]"),
    ("selfsigned.test", 1, "no validated MX offers authenticated TLS", "[5.7.10]"),
    ("twomx.test", 0, "mx2.twomx.test is DNSSEC-validated, dane-verified", ""),
    ("dane-mismatch.test", 1, "DANE: no-match", "[5.7.10]"),
    ("dane-nostarttls.test", 1, "STARTTLS not offered", "[5.7.10]"),
    ("plain.test", 1, "no MX host is DNSSEC-validated", "[5.7.10]"),
    # The policy could not be fetched (a redirect is not followed) and nothing is cached: doubt defers.
    ("sts-redirect.test", 2, "lookup error, try later: MX not DNSSEC-signed and its MTA-STS policy could not be "
     "learnt now: MtaStsRedirectError", "[4.4.3]"),
    ("sts-twotxt.test", 1, "no MX host is DNSSEC-validated", "[5.7.10]"),
]


@pytest.mark.parametrize(("domain", "status", "reason", "tail"), CASES, ids=[c[0] for c in CASES])
def test_check_verdict_for_each_testbed_zone(
    bed_ca: str, domain: str, status: int, reason: str, tail: str
) -> None:
    """RFC 8689 section 4.2.1 (MX validation by DNSSEC or MTA-STS, PKIX/DANE, REQUIRETLS after
    STARTTLS), RFC 7672 section 2.1.2 (bogus/SERVFAIL defer), RFC 8461 section 3 (policy discovery)."""
    code, text = _check(bed_ca, domain, "--probe")
    verdict = text.strip().splitlines()[-1]
    assert verdict.startswith("REQUIRETLS delivery possible: " + ("yes" if status == 0 else "no")), text
    assert reason in verdict, text
    assert verdict.endswith(tail), text
    assert code == status, text


def test_check_json_reports_dnssec_tlsa_and_probe(bed_ca: str) -> None:
    import json

    code, text = _check(bed_ca, "twomx.test", "--probe", "--json")
    doc: dict[str, Any] = json.loads(text)
    assert code == 0
    assert doc["mx_dnssec"] == "secure" and doc["requirement"] == "dane"
    mx1, mx2 = doc["hosts"]
    assert mx1["dane"] == "usable" and mx1["tlsa"][0]["usable"] is True
    assert mx1["probe"]["verified"] is True and mx1["probe"]["requiretls"] is False  # DANE-EE ignores expiry
    assert mx2["probe"]["requiretls"] is True
    assert doc["verdict"]["mx"] == "mx2.twomx.test"


def test_insecure_mx_with_sts_enforce_demands_sts(bed_ca: str) -> None:
    code, text = _check(bed_ca, "sts.test")
    assert "TLS policy demanded: sts-enforce" in text
    assert "MTA-STS: mode enforce" in text
    assert code == 0


def _sts(ca: str) -> StsResolver:
    dns_client = DnsClient(ResolverSettings(address=RESOLVER, timeout=5))
    return StsResolver(dns_client, StsSettings(cafile=ca, fetch_timeout=10))


@pytest.mark.parametrize(
    ("domain", "error"),
    [
        ("sts-redirect.test", MtaStsRedirectError),
        ("sts-oversize.test", MtaStsTooLargeError),
        ("sts-mediatype.test", MtaStsMediaTypeError),
        ("sts-badcert.test", MtaStsTlsError),
    ],
)
def test_testbed_policy_fetch_failures(bed_ca: str, domain: str, error: type[Exception]) -> None:
    """RFC 8461 section 3.3 failure cases against the testbed's HTTPS server."""
    resolver = _sts(bed_ca)
    with pytest.raises(error):
        run(resolver.fetch(domain, "x"))
    res = run(_sts(bed_ca).resolve(domain))
    assert res.status is StsStatus.FETCH_FAILED and res.policy is None


def test_testbed_two_sts_records_mean_no_policy(bed_ca: str) -> None:
    """RFC 8461 section 3.1: two v=STSv1 records: no policy."""
    res = run(_sts(bed_ca).resolve("sts-twotxt.test"))
    assert res.status is StsStatus.RECORD_INVALID and res.policy is None
