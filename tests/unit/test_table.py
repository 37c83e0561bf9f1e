"""The local policy tables: Postfix smtp_tls_policy_maps syntax plus optout= and requiretls=."""

from __future__ import annotations

from pathlib import Path

import pytest

from requiretls.config import load
from requiretls.errors import ConfigError
from requiretls.policy import PolicyTable

TABLE = """\
# destination rules
example.com     dane        optout=yes
example.net     dane-only   optout=no   protocols=>=TLSv1.3
.gov.example    secure      requiretls=yes
  match=nexthop:dot-nexthop
partner.example optout=no
[mx.relay.example]:587  encrypt
sub.example.org  verify, match=hostname, tafile=/etc/ta.pem
"""


def test_postfix_part_is_level_and_postfix_attributes_only() -> None:
    t = PolicyTable.parse(TABLE, "policy")
    net = t.lookup_domain("example.net")
    assert net is not None
    assert net.postfix_policy() == "dane-only protocols=>=TLSv1.3"
    assert net.optout is False and net.requiretls is None
    assert t.lookup_domain("example.com").postfix_policy() == "dane"  # type: ignore[union-attr]


def test_continuation_line_joins_the_entry() -> None:
    t = PolicyTable.parse(TABLE, "policy")
    gov = t.lookup_domain("agency.gov.example")
    assert gov is not None and gov.requiretls is True
    assert gov.postfix_policy() == "secure match=nexthop:dot-nexthop"
    assert gov.line == 4


def test_entry_with_only_our_attributes_has_no_postfix_part() -> None:
    entry = PolicyTable.parse(TABLE, "policy").lookup_domain("PARTNER.example.")
    assert entry is not None and entry.postfix_policy() is None and entry.optout is False


def test_parent_matching_is_by_dot_key_only_as_postfix_does() -> None:
    """smtp_tls_policy_maps: ``example.com`` matches only itself; ``.gov.example`` matches subdomains."""
    t = PolicyTable.parse(TABLE, "policy")
    assert t.lookup_domain("mail.example.com") is None
    assert t.lookup_domain("gov.example") is None
    assert t.lookup_domain("a.b.gov.example") is not None


def test_nexthop_keys_are_looked_up_verbatim() -> None:
    t = PolicyTable.parse(TABLE, "policy")
    assert t.lookup_nexthop("[mx.relay.example]:587").postfix_policy() == "encrypt"  # type: ignore[union-attr]
    assert t.lookup_nexthop("[mx.relay.example]") is None
    assert t.lookup_nexthop("example.com").postfix_policy() == "dane"  # type: ignore[union-attr]


def test_comma_separated_attributes_are_accepted() -> None:
    entry = PolicyTable.parse(TABLE, "policy").lookup_domain("sub.example.org")
    assert entry is not None and entry.postfix_policy() == "verify match=hostname tafile=/etc/ta.pem"


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("example.com  bogus", "unknown TLS security level 'bogus'"),
        ("example.com  dane optout=maybe", "optout: must be yes or no"),
        ("example.com  may match=hostname", "match: not valid with level 'may'"),
        ("example.com  dane frobnicate=1", "frobnicate: unknown attribute"),
        ("example.com  match=hostname", "needs a TLS level first"),
        ("example.com", "no value"),
        ("exa..mple.com!  dane", "not a domain"),
        ("example.com  dane optout=yes optout=no", "given twice"),
        ("example.com  none ciphers=high", "not valid with level 'none'"),
        ("example.com  dane junk", "expected name=value"),
    ],
)
def test_errors_name_file_line_and_key(line: str, needle: str) -> None:
    _assert_error(f"# comment\n\n{line}\n", "/etc/requiretls/policy:3: ", needle)


def _assert_error(table: str, prefix: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        PolicyTable.parse(table, "/etc/requiretls/policy")
    text = str(exc.value)
    assert text.startswith(prefix)
    assert needle in text


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        # protocols= as Postfix reads it (tls_misc.c tls_proto_mask_lims()): names, !exclusions, >= / <= bounds
        ("example.com  dane protocols=>=TLSv9", "protocols: unknown TLS protocol 'TLSv9' in '>=TLSv9'"),
        ("example.com  dane protocols=<=TLSv1.4", "unknown TLS protocol 'TLSv1.4'"),
        ("example.com  dane protocols=!SSLv2:!TLSv2", "unknown TLS protocol 'TLSv2' in '!TLSv2'"),
        ("example.com  dane protocols=TLS1.2", "unknown TLS protocol 'TLS1.2'"),
        ("example.com  dane protocols=>=SSLv2", "unknown TLS protocol 'SSLv2'"),  # no SSLv2 bound in Postfix
        ("example.com  dane protocols=>=", "unknown TLS protocol ''"),
        ("example.com  dane protocols=>=0x0303", "unknown TLS protocol '0x0303'"),  # stricter than Postfix
        ("example.com  dane protocols=:", "empty protocol list"),
        ("example.com  dane protocols=>=TLSv1.2 protocols=<=TLSv1.3", "protocols: given twice"),
        # a comma splits attributes in a policy table, so Postfix sees '!SSLv3' as a malformed attribute
        ("example.com  dane protocols=!SSLv2,!SSLv3", "expected name=value, got '!SSLv3'"),
        ("example.com  secure ciphers=ultra", "ciphers: unknown cipher grade 'ultra'"),
        ("example.com  secure ciphers=high ciphers=medium", "ciphers: given twice"),
        ("example.com  dane connection_reuse=sometimes", "connection_reuse: must be yes or no"),
        ("example.com  dane enable_rpk=1", "enable_rpk: must be yes or no"),
        ("example.com  secure servername=bad_name!", "servername: not a host name"),
        ("example.com  dane exclude=aNULL exclude=MD5", "exclude: given twice"),
    ],
)
def test_postfix_attribute_values_postfix_would_not_understand_are_errors(line: str, needle: str) -> None:
    _assert_error(f"ok.example dane\n{line}\n", "/etc/requiretls/policy:2: example.com: ", needle)


@pytest.mark.parametrize(
    "attrs",
    [
        "protocols=>=TLSv1.2",
        "protocols=<=TLSv1.3",
        "protocols=>=TLSv1.2:<=TLSv1.3",
        "protocols=!SSLv2:!SSLv3:!TLSv1:!TLSv1.1",
        "protocols=TLSv1.2:TLSv1.3",
        "protocols=>=tlsv1.2",  # Postfix compares protocol names without regard to case
        "protocols=>=SSLv3",
        "ciphers=high",
        "ciphers=MEDIUM",
        "ciphers=null",
        "connection_reuse=yes enable_rpk=no",
        "servername=hostname",
        "servername=mx.example.com",
        "exclude=aNULL:MD5",
        "match=hostname match=nexthop:dot-nexthop",
    ],
)
def test_postfix_attribute_values_postfix_understands_are_served_as_written(attrs: str) -> None:
    entry = PolicyTable.parse(f"example.com secure {attrs}\n", "t").lookup_domain("example.com")
    assert entry is not None and entry.postfix_policy() == f"secure {attrs}"


def test_the_table_error_reaches_the_config_loader_with_the_table_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "policy").write_text("# destinations\nexample.net dane-only protocols=>=TLSv9\n")
    (tmp_path / "requiretls.toml").write_text('[policy]\ntable = "policy"\n')
    with pytest.raises(ConfigError) as exc:
        load(str(tmp_path / "requiretls.toml"))
    assert str(exc.value).startswith(f"{tmp_path / 'policy'}:2: example.net: protocols: unknown TLS protocol")


def test_duplicate_key_is_an_error_naming_both_lines() -> None:
    with pytest.raises(ConfigError, match=r"^t:2: example\.com: duplicate entry \(first at line 1\)"):
        PolicyTable.parse("example.com dane\nEXAMPLE.COM. may\n", "t")


SENDERS = """\
ceo@example.com     requiretls=yes
@lists.example.com  optout=no
.corp.example       optout=yes
postmaster@         optout=no
<>                  optout=yes
"""


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("CEO@Example.COM", "ceo@example.com"),
        ("<ceo@example.com>", "ceo@example.com"),
        ("x@lists.example.com", "@lists.example.com"),
        ("x@a.corp.example", ".corp.example"),
        ("postmaster@anything.example", "postmaster@"),
        ("", "<>"),
        ("<>", "<>"),
        ("nobody@example.org", None),
    ],
)
def test_sender_lookup_order(address: str, key: str | None) -> None:
    entry = PolicyTable.parse(SENDERS, "senders", "sender").lookup_sender(address)
    assert (entry.key if entry else None) == key


def test_sender_table_refuses_tls_levels() -> None:
    with pytest.raises(ConfigError, match="sender rules take only optout= and requiretls="):
        PolicyTable.parse("a@b.example dane\n", "senders", "sender")


def test_idn_domain_is_matched_in_a_label_form() -> None:
    t = PolicyTable.parse("xn--bcher-kva.example dane-only optout=no\n", "t")
    assert t.lookup_domain("bücher.example") is not None
