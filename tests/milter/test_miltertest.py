"""The milter process under hostile header bytes, driven by an independent MTA side: Debian's ``miltertest``
(issue 17).  Each case is one message; the milter must answer at end-of-message, never tempfail for the
message's own bytes, and classify it (a malformed field is normal policy).

A raw client in :mod:`tests.milter.rawclient` covers what miltertest cannot send (its own buffer is smaller
than a long header): see test_rawclient.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("hostile.lua")
MILTERTEST = shutil.which("miltertest")

pytestmark = pytest.mark.skipif(MILTERTEST is None, reason="miltertest not installed (scripts/install-apt.sh)")


@pytest.fixture(scope="module")
def milter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``requiretls milter`` as a real process on a unix socket; yields (socket spec, log file)."""
    d = tmp_path_factory.mktemp("milter")
    sock = d / "m.sock"
    conf = d / "requiretls.toml"
    conf.write_text(
        f'[policy]\noptout_from = "trusted"\ntrusted_networks = ["10.0.0.0/8"]\n'
        f'[milter]\nsocket = "unix:{sock}"\nsocket_group = ""\nsocket_mode = "0666"\n'
    )
    logf = d / "milter.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(logf, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "requiretls", "milter", "--config", str(conf)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        end = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < end, logf.read_text(errors="replace")
            time.sleep(0.05)
        yield f"unix:{sock}", logf
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run(sock: str, name: bytes, value: bytes, *, sasl: bytes = b"", sender: bytes = b"<a@sender.test>",
        subject: bytes = b"") -> list[str]:
    """One message through miltertest; its report lines (REPLY ..., ADDED ..., DELETED ...)."""
    argv = [MILTERTEST or "miltertest", "-s", str(SCRIPT), b"-DSOCK=" + sock.encode(), b"-DHNAME=" + name,
            b"-DHVALUE=" + value, b"-DSENDER=" + sender, b"-DSASL=" + sasl, b"-DSUBJECT=" + subject]
    r = subprocess.run(argv, capture_output=True, timeout=60)
    out = r.stdout.decode("utf-8", "backslashreplace").splitlines()
    assert r.returncode == 0, (r.returncode, out, r.stderr.decode(errors="replace"))
    return out


def _logged(log: Path, text: str) -> bool:
    end = time.monotonic() + 5
    while time.monotonic() < end:
        if text in log.read_text(errors="replace"):
            return True
        time.sleep(0.05)
    return False


def test_plain_message_is_accepted(milter: tuple[str, Path]) -> None:
    out = run(milter[0], b"Subject", b"hello")
    assert out == ["REPLY accept"]


def test_8bit_subject_with_optout_cookie_from_sasl_user_opts_out_and_keeps_the_bytes(
        milter: tuple[str, Path]) -> None:
    out = run(milter[0], b"Subject", b"[tls-optout] caf\xe9", sasl=b"alice",
              subject=b"=?unknown-8bit?q?caf=E9?=")
    assert out[0] == "REPLY accept"
    assert "SUBJECT as expected" in out  # cookie gone, the 8-bit byte kept (RFC 2047 unknown-8bit)
    assert "ADDED TLS-Required: No" in out


def test_8bit_subject_with_requiretls_cookie_from_sasl_user_is_tagged(milter: tuple[str, Path]) -> None:
    out = run(milter[0], b"Subject", b"[requiretls] caf\xe9", sasl=b"alice", subject=b"=?unknown-8bit?q?caf=E9?=")
    assert out[0] == "REPLY accept"
    assert "SUBJECT as expected" in out
    assert "ADDED X-RequireTLS-Route: relay" in out


def test_utf8_subject_with_cookie_is_rewritten_as_utf8_encoded_word(milter: tuple[str, Path]) -> None:
    out = run(milter[0], b"Subject", "[tls-optout] café".encode(), sasl=b"alice",
              subject=b"=?utf-8?b?Y2Fmw6k=?=")
    assert out[0] == "REPLY accept" and "SUBJECT as expected" in out


def test_8bit_original_tls_required_is_malformed_and_left_as_it_is(milter: tuple[str, Path]) -> None:
    sock, log = milter
    out = run(sock, b"X-Original-TLS-Required", b"No\xe9")
    assert out == ["REPLY accept"]  # no edit: the field cannot be written back, and it opts nothing out
    assert _logged(log, r"malformed TLS-Required value 'No\\udce9'")


def test_8bit_tls_required_is_malformed_normal_policy(milter: tuple[str, Path]) -> None:
    out = run(milter[0], b"TLS-Required", b"No\xe9")
    assert out == ["REPLY accept"]


def test_utf8_original_tls_required_is_given_back(milter: tuple[str, Path]) -> None:
    out = run(milter[0], b"X-Original-TLS-Required", "Nö".encode())
    assert out[0] == "REPLY accept"
    assert "ADDED TLS-Required: Nö" in out and "DELETED X-Original-TLS-Required" in out


@pytest.mark.parametrize("name", [b"X-\xe9", b"\xff\xfe", b"Subject\xe9"])
def test_header_name_that_is_not_utf8_still_gets_a_reply(milter: tuple[str, Path], name: bytes) -> None:
    out = run(milter[0], name, b"x")
    assert out == ["REPLY accept"]


def test_8bit_sender_of_a_tagged_message_is_refused_not_tempfailed(milter: tuple[str, Path]) -> None:
    sock, log = milter
    out = run(sock, b"Subject", b"[requiretls] hi", sasl=b"alice", sender=b"<caf\xe9@sender.test>")
    assert out == ["REPLY replycode"]
    assert _logged(log, 'action=reject, fields="MAIL FROM"')


def test_8bit_sasl_name_is_no_authentication(milter: tuple[str, Path]) -> None:
    sock, log = milter
    out = run(sock, b"Subject", b"[tls-optout] hi", sasl=b"al\xe9")
    assert out == ["REPLY accept"]  # the cookie is not honoured: an unreadable SASL name authenticates no one
    assert _logged(log, "macro={auth_authen}, problem=")
