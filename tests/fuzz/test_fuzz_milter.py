"""The milter's callbacks fed arbitrary bytes as libmilter hands them over (issue 17): header names and values,
MAIL FROM and RCPT TO, SASL name, on each Postfix version.  End-of-message always answers (never an exception,
never tempfail: nothing in these bytes is internal doubt), and every edit can be written back through pymilter
(text that encodes as strict UTF-8)."""

from __future__ import annotations

import Milter
from hypothesis import given
from hypothesis import strategies as st
from Milter.testctx import TestCtx

from requiretls.milter.app import RequireTLSMilter
from requiretls.policy import LocalPolicy, OptoutFrom

from .support import FUZZ

TestCtx.__test__ = False

NAMES = [b"Subject", b"TLS-Required", b"X-Original-TLS-Required", b"Require-TLS-ESMTP", b"X-RequireTLS-Route",
         b"X-RequireTLS-Handback", b"X-RequireTLS-Nexthop", b"From", b"subject", b"X-\xe9", b"\xff"]
VALUE_WORDS = [b"No", b"no", b"yes", b"[tls-optout]", b"[requiretls]", b" ", b"\t", b"\r\n ", b"\n\t", b"\xe9",
               b"\xc3\xa9", b"\xff\xfe", b"\x00", b"=?utf-8?q?", b"=?unknown-8bit?q?", b"?=", b"=E9", b"relay",
               b"<a@b>", b"caf"]
value = st.one_of(st.binary(max_size=80), st.lists(st.sampled_from(VALUE_WORDS), max_size=12).map(b"".join))
address = st.one_of(st.binary(max_size=24), st.sampled_from([b"<a@sender.test>", b"<>", b"<caf\xe9@x.test>",
                                                            b"<a\x00@b>", b"bob@dane.test"]))
_NR = 0
for _flag in ("P_NR_CONN", "P_NR_HELO", "P_NR_MAIL", "P_NR_RCPT", "P_NR_DATA", "P_NR_UNKN", "P_NR_EOH",
              "P_NR_BODY", "P_NR_HDR"):
    _NR |= getattr(Milter, _flag)


def _strict(*values: object) -> None:
    for v in values:
        if isinstance(v, str):
            v.encode("utf-8")  # what pymilter's C layer does with an edit ("s" format): raises on a surrogate


@FUZZ
@given(sender=address, params=st.lists(st.sampled_from(["REQUIRETLS", "REQUIRETLS=x", "RET=FULL", "BODY=8BITMIME"]),
                                       max_size=2),
       rcpts=st.lists(address, min_size=1, max_size=3), fields=st.lists(st.tuples(
           st.one_of(st.sampled_from(NAMES), st.binary(min_size=1, max_size=10)), value), max_size=8),
       sasl=st.sampled_from([None, "alice"]), version=st.sampled_from(["3.7.11", "3.10.4", "3.11.0"]),
       ip=st.sampled_from(["127.0.0.1", "192.0.2.7"]))
def test_eom_always_answers_and_every_edit_is_writable(sender: bytes, params: list[str], rcpts: list[bytes],
                                                       fields: list[tuple[bytes, bytes]], sasl: str | None,
                                                       version: str, ip: str) -> None:
    RequireTLSMilter.policy_source = staticmethod(lambda: LocalPolicy(optout_from=OptoutFrom.TRUSTED))
    RequireTLSMilter.postfix_override = None
    Milter.factory = RequireTLSMilter
    # pymilter's test context does not understand NOREPLY: offer a protocol without the no-reply bits.
    c = TestCtx()
    c._opts = TestCtx.default_opts = [Milter.CURR_ACTS, 0x1FFFFF & ~_NR, 0, 0]
    c.addheader = lambda f, v, i=-1: _strict(f, v)
    c.chgheader = lambda f, i, v: _strict(f, v)
    c.chgfrom = lambda s, p=None: _strict(s, p)
    c._setsymval("v", f"Postfix {version}")
    c._setsymval("i", "4ABC123")
    c._setsymval("{rcpt_mailer}", "smtp")
    if sasl:
        c._setsymval("{auth_authen}", sasl)
    assert c._connect(ip=ip) == Milter.CONTINUE
    m = c.getpriv()
    c._stage = Milter.M_ENVFROM  # the test context reads macros per stage
    m.envfrom_bytes(sender, *(p.encode() for p in params))
    c._stage = Milter.M_ENVRCPT
    for r in rcpts:
        m.envrcpt_bytes(r)
    c._stage = Milter.M_EOH
    for name, val in fields:
        try:
            fld = name.decode("utf-8")  # pymilter's C layer decodes the name strictly; a failure skips the field
        except UnicodeDecodeError:
            continue
        m.header_bytes(fld, val)
    c._body = b""
    c._stage = Milter.M_EOM
    rc = m.eom()
    assert m.doubt is None and m.connect_doubt is None
    assert rc in (Milter.ACCEPT, Milter.REJECT), rc
