"""The milter process against a raw milter client (issue 17): a header too long for libmilter's default
request limit (65,535 bytes) is read and answered, not a dropped connection that the MTA would tempfail on
every retry."""

from __future__ import annotations

from pathlib import Path

import pytest

from .rawclient import RawMilter
from .test_miltertest import milter  # noqa: F401 - the fixture


@pytest.mark.parametrize("size", [1_000, 65_600, 100_000, 102_400])
def test_long_header_is_read_and_the_message_accepted(milter: tuple[str, Path], size: int) -> None:  # noqa: F811
    c = RawMilter(milter[0].removeprefix("unix:"))
    try:
        c.negotiate()
        c.macro(b"C", v="Postfix 3.10.4")
        c.connect()
        c.mail(b"<a@sender.test>")
        c.macro(b"R", **{"{rcpt_mailer}": "smtp", "{rcpt_host}": "dane.test"})
        c.rcpt(b"<bob@dane.test>")
        c.header(b"Subject", b"hi")
        c.header(b"X-Long", b"x" * size)
        assert c.eom().final == b"a"
    finally:
        c.close()


def test_long_subject_with_cookie_is_rewritten(milter: tuple[str, Path]) -> None:  # noqa: F811
    c = RawMilter(milter[0].removeprefix("unix:"))
    try:
        c.negotiate()
        c.connect(ip=b"10.1.2.3")
        c.macro(b"M", **{"{auth_authen}": "alice"})
        c.mail(b"<a@sender.test>")
        c.rcpt(b"<bob@dane.test>")
        c.header(b"Subject", b"[tls-optout] " + b"\xe9" * 70_000)
        out = c.eom()
        assert out.final == b"a"
        (subject,) = [d for cmd, d in out.edits if cmd == b"m" and d[4:].startswith(b"Subject\0")]
        assert subject.count(b"=E9") == 70_000 and b"[tls-optout]" not in subject
    finally:
        c.close()
