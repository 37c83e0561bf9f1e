"""requiretls.config: one TOML file; every error names file, line and key; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from requiretls.addresses import Endpoint, ListenAddress, NextHop
from requiretls.config import MAX_ENTRIES, MAX_TIMEOUT, SCHEMA, load, parse, render_default_config
from requiretls.errors import ConfigError
from requiretls.policy import OptoutFrom, PreflightMode


def _write(tmp_path: Path, text: str, name: str = "requiretls.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_without_a_file() -> None:
    s = load(None)
    assert s.local_policy.optout_from is OptoutFrom.ANY
    assert len(s.local_policy.table) == 0
    assert s.dns.resolver is None  # was s.get("dns", "resolver") == "": empty now parses to None


def test_full_config_with_tables_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "policy").write_text("example.net dane-only optout=no\n")
    (tmp_path / "senders").write_text("ceo@example.com requiretls=yes\n")
    path = _write(
        tmp_path,
        '[policy]\ntable = "policy"\nsender_table = "senders"\noptout_from = "trusted"\n'
        'trusted_networks = ["10.0.0.0/8"]\npreflight = "warn"\n[dns]\nresolver = "127.0.0.1:5353"\ntimeout = 2\n',
    )
    s = load(path)
    lp = s.local_policy
    assert lp.optout_from is OptoutFrom.TRUSTED and lp.preflight is PreflightMode.WARN
    assert lp.table.lookup_domain("example.net") is not None
    assert lp.senders.lookup_sender("ceo@example.com") is not None
    assert [str(n) for n in lp.trusted_networks] == ["10.0.0.0/8"]
    assert s.dns.timeout == 2 and isinstance(s.dns.timeout, float)  # was s.get("dns", "timeout") == 2
    assert s.dns.resolver == Endpoint("127.0.0.1", 5353)
    assert s.policy.table == str(tmp_path / "policy") and s.policy.optout_from is OptoutFrom.TRUSTED


@pytest.mark.parametrize(
    ("text", "line", "key", "needle"),
    [
        ('[policy]\noptout_from = "sometimes"\n', 2, "policy.optout_from", "must be one of"),
        ('[policy]\n\n  optuot_from = "any"\n', 3, "policy.optuot_from", "unknown key"),
        ('[polcy]\nx = 1\n', 1, "polcy", "unknown section"),
        ('[policy]\ntrusted_networks = ["10.0.0.0/33"]\n', 2, "policy.trusted_networks", "not an IP network"),
        ('[policy]\ntrusted_networks = "10.0.0.0/8"\n', 2, "policy.trusted_networks", "must be a list"),
        ('[dns]\nresolver = "resolver.example"\n', 2, "dns.resolver", "is not IP or IP:PORT"),
        ('[dns]\ntimeout = true\n', 2, "dns.timeout", "must be an integer or a number"),
        ('[dns]\ntimeout = -1\n', 2, "dns.timeout", "greater than 0"),
        ('[policy]\ntable = "missing-table"\n', 2, "policy.table", "cannot read table"),
        ('[front]\n\nbackend = ""\n', 3, "front.backend", "write unix:public/NAME"),
        ('[front]\nbackend = "unix:../x"\n', 2, "front.backend", "write unix:public/NAME"),
        ('[front]\nmetrics = "192.0.2.1:9104"\n', 2, "front.metrics", "not a loopback address"),
    ],
)
def test_semantic_errors_name_file_line_and_key(
    tmp_path: Path, text: str, line: int, key: str, needle: str
) -> None:
    _assert_error(tmp_path, text, line, key, needle)


def _assert_error(tmp_path: Path, text: str, line: int, key: str, needle: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert str(exc.value).startswith(f"{path}:{line}: {key}: ")
    assert needle in str(exc.value)


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, '[policy]\noptout_from = "any"\ntable = \n')
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert str(exc.value).startswith(f"{path}:3: TOML syntax error")


def test_table_error_names_the_table_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "policy").write_text("ok.example dane\nbad.example dane optout=perhaps\n")
    path = _write(tmp_path, '[policy]\ntable = "policy"\n')
    with pytest.raises(ConfigError, match=r"/policy:2: bad\.example: optout: must be yes or no"):
        load(path)


def test_rendered_default_config_is_valid_toml_and_documents_every_key() -> None:
    text = render_default_config()
    setting = re.compile(r"^#[a-z_]+ = ")
    uncommented = "\n".join(line[1:] if setting.match(line) else line for line in text.splitlines())
    data = tomllib.loads(uncommented)
    assert parse(uncommented, "rendered") == {s: dict(v) for s, v in parse("", "x").items()}
    assert set(data) == {"policy", "dns", "mta_sts", "cache", "policyd", "milter", "relay", "notify", "front", "log"}


@pytest.mark.parametrize(
    ("text", "line", "key", "needle"),
    [
        # numbers are finite and bounded (TOML allows inf and nan, and integers of any size)
        ("[policyd]\nlookup_timeout = inf\n", 2, "policyd.lookup_timeout", "finite"),
        ("[policyd]\nlookup_timeout = nan\n", 2, "policyd.lookup_timeout", "finite"),
        ("[policyd]\nlookup_timeout = 3600.5\n", 2, "policyd.lookup_timeout", "at most 3600"),
        ("[policyd]\nanswer_ttl = 86401\n", 2, "policyd.answer_ttl", "at most 86_400"),
        ("[policyd]\nanswer_cache_size = 0\n", 2, "policyd.answer_cache_size", "at least 1"),
        ("[cache]\nmax_entries = 99999999999999999999999\n", 2, "cache.max_entries", "at most 10_000_000"),
        ("[cache]\nmax_entries = -5\n", 2, "cache.max_entries", "at least 1"),
        ("[cache]\nmax_entries = 1.5\n", 2, "cache.max_entries", "must be an integer"),
        ("[dns]\ntimeout = 0\n", 2, "dns.timeout", "greater than 0"),
        ("[dns]\ntimeout = 1e9\n", 2, "dns.timeout", "at most 3600"),
        ("[mta_sts]\nfetch_timeout = -inf\n", 2, "mta_sts.fetch_timeout", "finite"),
        ("[milter]\ntimeout = 4000\n", 2, "milter.timeout", "at most 3600"),
        ("[milter]\npreflight_timeout = 0.0\n", 2, "milter.preflight_timeout", "greater than 0"),
        ("[relay]\ntimeout = 7200\n", 2, "relay.timeout", "at most 3600"),
        # addresses are parsed once, here
        ('[dns]\nresolver = "127.0.0.1:0"\n', 2, "dns.resolver", "1 to 65535"),
        ('[dns]\nresolver = "[::1]:70000"\n', 2, "dns.resolver", "1 to 65535"),
        ('[relay]\nreinject = "localhost:10026"\n', 2, "relay.reinject", "is not IP"),
        ('[relay]\nrelayhost = "[smtp.example.com"\n', 2, "relay.relayhost", "missing ']'"),
        ('[relay]\nrelayhost = "smtp.example.com:0"\n', 2, "relay.relayhost", "1 to 65535"),
        ('[relay]\nrelayhost = "192.0.2.1"\n', 2, "relay.relayhost", "in brackets"),
        ('[relay]\nlisten = "inet:70000@127.0.0.1"\n', 2, "relay.listen", "1 to 65535"),
        ('[relay]\nlisten = "unix:relay.sock"\n', 2, "relay.listen", "absolute path"),
        ('[milter]\nsocket = "tcp:127.0.0.1:8891"\n', 2, "milter.socket", "use unix:"),
        ('[policyd]\nlisten = ["unix:/run/p.sock", "inet:example.com:1"]\n', 2, "policyd.listen", "is not IP"),
        ('[policyd]\nlisten = []\n', 2, "policyd.listen", "at least one"),
        ('[policyd]\nlisten = [1]\n', 2, "policyd.listen", "must be strings"),
        # the metrics endpoint is loopback unless the admin says otherwise
        ('[policyd]\nmetrics = "0.0.0.0:9100"\n', 2, "policyd.metrics", "not a loopback address"),
        ('[policyd]\nmetrics = "192.0.2.7:9100"\nmetrics_allow_remote = false\n', 2, "policyd.metrics",
         "metrics_allow_remote = true"),
        ('[policyd]\nmetrics = "127.0.0.1"\n', 2, "policyd.metrics", "has no port"),
        ('[policyd]\nmetrics = "localhost:9100"\n', 2, "policyd.metrics", "is not IP"),
    ],
)
def test_values_out_of_range_or_malformed_name_file_line_and_key(
    tmp_path: Path, text: str, line: int, key: str, needle: str
) -> None:
    _assert_error(tmp_path, text, line, key, needle)


@pytest.mark.parametrize(
    ("text", "check"),
    [
        ("[policyd]\nlookup_timeout = 3600\n", lambda s: s.policyd.lookup_timeout == MAX_TIMEOUT),
        ("[cache]\nmax_entries = 10_000_000\n", lambda s: s.cache.max_entries == MAX_ENTRIES),
        ("[policyd]\nanswer_cache_size = 1\n", lambda s: s.policyd.answer_cache_size == 1),
        ('[policyd]\nmetrics = "127.0.0.1:9100"\n', lambda s: s.policyd.metrics == Endpoint("127.0.0.1", 9100)),
        ('[policyd]\nmetrics = "[::1]:9100"\n', lambda s: s.policyd.metrics == Endpoint("::1", 9100)),
        ('[policyd]\nmetrics = "0.0.0.0:9100"\nmetrics_allow_remote = true\n',
         lambda s: s.policyd.metrics == Endpoint("0.0.0.0", 9100) and s.policyd.metrics_allow_remote),
        ('[dns]\nresolver = "::1"\n', lambda s: s.dns.resolver == Endpoint("::1", 53)),
        ('[relay]\nreinject = "127.0.0.2"\n', lambda s: s.relay.reinject == Endpoint("127.0.0.2", 10026)),
        ('[milter]\nsocket_mode = "0666"\n', lambda s: s.milter.socket_mode == 0o666),
        ('[mta_sts]\ncafile = "/etc/ca.pem"\n', lambda s: s.mta_sts.cafile == "/etc/ca.pem"),
        ("", lambda s: s.mta_sts.cafile is None and s.relay.cafile is None and s.relay.relayhost is None),
        ('[policyd]\nlisten = ["unix:/run/p.sock", "inet:[::1]:8461"]\n',
         lambda s: s.policyd.listen == (ListenAddress("unix", path="/run/p.sock"),
                                        ListenAddress("inet", endpoint=Endpoint("::1", 8461)))),
    ],
)
def test_values_at_their_bounds_are_typed(tmp_path: Path, text: str, check: Any) -> None:
    assert check(load(_write(tmp_path, text)))


@pytest.mark.parametrize(
    ("relayhost", "hop"),
    [
        ("example.com", NextHop("example.com", 25, mx=True)),  # Postfix looks up the MX of a bare name
        ("example.com:587", NextHop("example.com", 587, mx=True)),
        ("[smtp.example.com]", NextHop("smtp.example.com", 25, mx=False)),
        ("[smtp.example.com]:587", NextHop("smtp.example.com", 587, mx=False)),
        ("[ipv6:2001:db8::1]:25", NextHop("2001:db8::1", 25, mx=False)),
    ],
)
def test_relayhost_is_a_next_hop_and_the_milter_gets_it_too(tmp_path: Path, relayhost: str, hop: NextHop) -> None:
    s = load(_write(tmp_path, f'[relay]\nrelayhost = "{relayhost}"\ncafile = "/etc/ca.pem"\nhelo_name = "mx.test"\n'))
    assert s.relay.relayhost == hop
    assert s.milter.relayhost == hop
    assert (s.milter.probe_cafile, s.milter.probe_helo_name) == ("/etc/ca.pem", "mx.test")


@pytest.mark.parametrize(
    ("text", "key", "attr", "new"),
    [
        ('[milter]\nsocket = "inet:8891@127.0.0.1"\n', "milter.socket", "milter", "inet:127.0.0.1:8891"),
        ('[milter]\nsocket = "local:/run/m.sock"\n', "milter.socket", "milter", "unix:/run/m.sock"),
        ('[relay]\nlisten = "inet:10025@127.0.0.1"\n', "relay.listen", "relay", "inet:127.0.0.1:10025"),
        ('[relay]\nlisten = "inet6:10025@::1"\n', "relay.listen", "relay", "inet:[::1]:10025"),
    ],
)
def test_old_listen_forms_are_read_with_a_warning_naming_the_new_form(
    tmp_path: Path, text: str, key: str, attr: str, new: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path, text)
    with caplog.at_level(logging.WARNING, logger="requiretls"):
        s = load(path)
    section = getattr(s, attr)
    address = section.socket if attr == "milter" else section.listen
    assert str(address) == new
    assert len(s.warnings) == 1
    assert s.warnings[0].startswith(f"{path}:2: {key}: ") and f"write {new!r}" in s.warnings[0]
    assert s.warnings[0] in caplog.text


def test_new_listen_forms_give_no_warning(tmp_path: Path) -> None:
    s = load(_write(tmp_path, '[milter]\nsocket = "inet:127.0.0.1:8891"\n[relay]\nlisten = "unix:/run/r.sock"\n'
                              '[policyd]\nlisten = ["inet:[::1]:8461"]\n'))
    assert s.warnings == ()
    assert s.milter.socket.libmilter() == "inet:8891@127.0.0.1"


def test_each_section_is_a_frozen_typed_object_and_settings_get_is_gone() -> None:
    s = load(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.policyd.lookup_timeout = 1.0  # type: ignore[misc]
    assert not hasattr(s, "get")
    assert isinstance(s.policyd.listen, tuple) and isinstance(s.milter.socket, ListenAddress)
    assert s.policy.trusted_networks == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def test_every_number_key_documents_its_bounds() -> None:
    for section, keys in SCHEMA.items():
        for key, spec in keys.items():
            if spec.type in (int, (int, float)):
                assert "Range: " in spec.doc and spec.check is not None, f"{section}.{key}"
