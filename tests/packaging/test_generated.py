"""Files generated from the code stay in step with it: the manual pages (scripts/gen-man.py), the shipped
configuration (``requiretls default-config``), the units' hardening, the package version."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from requiretls import __version__
from requiretls.config import SCHEMA, parse, render_default_config

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "packaging/debian"


def _gen_man() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_man", ROOT / "scripts/gen-man.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", ["requiretls.8", "requiretls.toml.5"])
def test_committed_man_page_matches_the_generator(page: str) -> None:
    gen = _gen_man()
    assert (ROOT / "man" / page).read_text() == gen.PAGES[page](), "run: python scripts/gen-man.py"


def test_toml_man_page_documents_every_key() -> None:
    text = (ROOT / "man/requiretls.toml.5").read_text()
    for section, keys in SCHEMA.items():
        assert f'.SH "[{section}]"' in text
        for key in keys:
            troff_key = key.replace("-", "\\-")
            assert f"\\fB{troff_key}\\fR = " in text, f"{section}.{key}"


def test_command_man_page_documents_every_subcommand() -> None:
    text = (ROOT / "man/requiretls.8").read_text()
    for name in ("explain", "default-config", "check", "milter", "postfix-config", "policyd", "relay"):
        troff_name = name.replace("-", "\\-")
        assert f'.SS "requiretls {troff_name}"' in text, name


def test_shipped_config_is_the_default_config() -> None:
    assert (ROOT / "packaging/requiretls.toml").read_text() == render_default_config() + "\n", \
        "run: requiretls default-config > packaging/requiretls.toml"


def test_shipped_tables_are_empty_and_the_installed_config_uses_them(tmp_path: Path) -> None:
    # debian/rules turns on the two table keys; everything else stays at its default.
    text = (ROOT / "packaging/requiretls.toml").read_text()
    text = text.replace('#table = ""', 'table = "policy"').replace('#sender_table = ""', 'sender_table = "senders"')
    values = parse(text, "requiretls.toml")
    assert values["policy"]["table"] == "policy" and values["policy"]["sender_table"] == "senders"
    for name in ("policy.table", "senders.table"):
        lines = (DEBIAN / name).read_text().splitlines()
        assert all(not line.strip() or line.startswith("#") for line in lines), name


def test_debian_version_is_the_code_version() -> None:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    m = re.match(r"requiretls \(([^)-]+)-\d+\)", first)
    assert m and m.group(1) == __version__, first


def _unit(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (DEBIAN / f"requiretls.requiretls-{name}.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.parametrize("name", ["milter", "policyd", "relay"])
def test_unit_is_hardened(name: str) -> None:
    u = _unit(name)
    expect = {
        "User": "_requiretls", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "RuntimeDirectory": "requiretls",
        "StateDirectory": "requiretls", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "ReadWritePaths": "-/var/spool/postfix/requiretls",
        "ExecStart": f"/usr/bin/requiretls {name} --config /etc/requiretls/requiretls.toml",
        "Type": "simple" if name == "milter" else "notify",
    }
    for key, value in expect.items():
        assert u.get(key) == [value], (key, u.get(key))
    assert "@system-service" in u["SystemCallFilter"]

