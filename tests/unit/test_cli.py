"""`requiretls explain`: the admin's dry run, in text and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from requiretls.cli import main

MSG = b"From: a@sender.example\r\nSubject: hello\r\nTLS-Required: No\r\n\r\nbody\r\n"


def _run(args: list[str], stdin: bytes = MSG) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "requiretls", *args], input=stdin.decode(), capture_output=True, text=True, timeout=60
    )


def test_explain_json_shape() -> None:
    r = _run(["explain", "--sender", "a@sender.example", "--rcpt", "b@dest.example", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"class", "recipients", "reasons", "header_edits", "reject"}
    assert out["class"] == "optout"
    assert out["recipients"]["b@dest.example"]["class"] == "optout"
    assert out["reject"] is None
    assert {"action": "add", "name": "X-RequireTLS-Route", "value": "relaxed"} in out["header_edits"]


def test_explain_text_names_class_and_reasons() -> None:
    r = _run(["explain", "--sender", "a@s.example", "--rcpt", "b@d.example", "--esmtp", "REQUIRETLS"])
    assert r.returncode == 0, r.stderr
    assert "class:       requiretls" in r.stdout
    assert "REQUIRETLS wins" in r.stdout
    assert "RET=HDRS" in r.stdout


def test_explain_with_config_and_preflight_reject(tmp_path: Path) -> None:
    (tmp_path / "policy").write_text("dest.example secure requiretls=yes\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[policy]\ntable = "policy"\npreflight = "reject"\n')
    r = _run(["explain", "--config", str(cfg), "--sender", "a@s.example", "--rcpt", "b@dest.example", "--json",
              "--impossible", "dest.example=MX does not offer REQUIRETLS"])
    out = json.loads(r.stdout)
    assert out["class"] == "requiretls"
    assert out["reject"] == {
        "code": 550,
        "dsn": "5.7.30",
        "text": "REQUIRETLS delivery to dest.example is not possible: MX does not offer REQUIRETLS",
    }


def test_explain_config_syntax_error_prints_file_line_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text('[policy]\noptout_from = "any\n')
    r = _run(["explain", "--config", str(cfg), "--sender", "a@s.example", "--rcpt", "b@d.example"])
    assert r.returncode == 2
    assert r.stderr.startswith(f"{cfg}:2: ")
    assert r.stdout == ""


def test_explain_reads_message_file_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(MSG.replace(b"TLS-Required: No", b"TLS-Required: Yes"))
    assert main(["explain", "--sender", "a@s.example", "--rcpt", "b@d.example", "--json", str(eml)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["class"] == "default"
    assert any("malformed TLS-Required" in r for r in out["reasons"])


def test_version() -> None:
    r = _run(["--version"])
    assert r.returncode == 0 and r.stdout.startswith("requiretls ")
