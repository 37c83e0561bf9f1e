"""The declared layering (architecture, "Components"): facts are gathered by ``dest``, judged by ``policy``,
acted on by adapters.  ``policy``, ``facts`` and ``addresses`` import no I/O library and nothing from
``dest``; ``dest`` imports nothing from ``policy``; no adapter imports another adapter; no package imports
another's private names."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[2] / "requiretls"
ADAPTERS = {"milter", "policyd", "relay", "front", "notify"}
HEAVY = ("dns", "ssl", "sqlite3", "asyncio", "smtplib", "cryptography", "requiretls.dest")


def _imports(path: pathlib.Path) -> list[tuple[str, str]]:
    """(module, name) for every ``from requiretls... import name`` and ``import requiretls...`` in a file."""
    out: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.extend((node.module, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            # relative import inside a package: resolve against the file's package
            base = path.relative_to(PKG.parent).with_suffix("").parts[: -node.level]
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.extend((module, a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            out.extend((a.name, "") for a in node.names)
    return [(m, n) for m, n in out if m == "requiretls" or m.startswith("requiretls.")]


def _package(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def _target(module: str, name: str) -> str:
    parts = module.split(".")
    if len(parts) > 1:
        return parts[1]
    return name  # from requiretls import X


FILES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("pure", ["requiretls.policy", "requiretls.facts", "requiretls.addresses"])
def test_pure_modules_load_no_io_library(pure: str) -> None:
    code = (f"import sys, {pure}, requiretls.policy.eligibility, requiretls.policy.tlsmap; "
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []


def test_policy_and_facts_import_nothing_from_dest_or_adapters() -> None:
    bad = [f"{f.relative_to(PKG)}: {m}.{n}" for f in FILES if _package(f) in ("policy", "facts", "addresses")
           for m, n in _imports(f) if _target(m, n) in ADAPTERS | {"dest", "config", "runtime", "cli"}]
    assert bad == []


def test_dest_imports_nothing_from_policy_or_adapters() -> None:
    bad = [f"{f.relative_to(PKG)}: {m}.{n}" for f in FILES if _package(f) == "dest"
           for m, n in _imports(f) if _target(m, n) in ADAPTERS | {"policy", "config", "runtime", "cli"}]
    assert bad == []


def test_no_adapter_imports_another_adapter() -> None:
    bad = [f"{f.relative_to(PKG)}: {m}.{n}" for f in FILES if _package(f) in ADAPTERS
           for m, n in _imports(f) if _target(m, n) in ADAPTERS - {_package(f)}]
    assert bad == []


def test_no_private_name_crosses_a_package() -> None:
    bad = [f"{f.relative_to(PKG)}: {m}.{n}" for f in FILES for m, n in _imports(f)
           if n.startswith("_") and not n.startswith("__") and _target(m, n) != _package(f)]
    assert bad == []
