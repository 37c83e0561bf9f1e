"""requiretls.config: one TOML file; every error names file, line and key; unknown keys are errors."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from requiretls.config import load, parse, render_default_config
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
    assert s.get("dns", "resolver") == ""


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
    assert s.get("dns", "timeout") == 2


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
    ],
)
def test_semantic_errors_name_file_line_and_key(
    tmp_path: Path, text: str, line: int, key: str, needle: str
) -> None:
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
    assert set(data) == {"policy", "dns", "mta_sts", "cache", "policyd", "milter", "relay", "log"}
