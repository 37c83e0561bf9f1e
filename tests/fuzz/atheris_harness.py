"""Coverage-guided fuzzing (atheris / libFuzzer) of the same parsers as the hypothesis tests.

    .venv/bin/python tests/fuzz/atheris_harness.py TARGET -runs=100000 [-max_total_time=S] [libFuzzer flags]

TARGET is one of the keys of ``TARGETS`` (``all`` runs each in turn with the same flags); ``make fuzz`` runs
every target.  Any exception other than the parser's documented error is a crash: libFuzzer stops and writes
the input to ``crash-*``.  Not part of ``make test`` (atheris is installed by ``make fuzz`` only).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    from requiretls import config
    from requiretls.dest.mtasts import MtaStsPolicyError, MtaStsRecordError, parse_policy, select_sts_record
    from requiretls.errors import ConfigError
    from requiretls.front import protocol as front
    from requiretls.policy import Envelope, LocalPolicy, MessageFacts, PolicyTable, Session, decide
    from requiretls.policy.headers import decode_subject, find_cookie, parse_header_block, parse_tls_required
    from requiretls.policy.tlsmap import parse_key
    from requiretls.policyd.metrics import Metrics
    from requiretls.policyd.netstring import Decoder, NetstringError
    from requiretls.policyd.server import PolicyService, ServiceSettings
    from requiretls.relay.agent import _take_params, strip_private

LOOP = asyncio.new_event_loop()
TABLE = PolicyTable.parse("a.example requiretls=yes\nb.example optout=no\n[r.example]:25 encrypt\n", "policy")
SERVICE = PolicyService(TABLE, None, Metrics(), ServiceSettings(answer_ttl=0))
POLICY = LocalPolicy(table=TABLE)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def netstring(data: bytes) -> None:
    dec = Decoder(64)
    fdp = atheris.FuzzedDataProvider(data)
    while fdp.remaining_bytes():
        try:
            dec.feed(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16)))
        except NetstringError:
            return


def socketmap(data: bytes) -> None:
    wire = LOOP.run_until_complete(SERVICE.reply(data))
    (payload,) = Decoder(100_000).feed(wire)
    assert payload.split(b" ", 1)[0] in (b"OK", b"NOTFOUND", b"TEMP", b"PERM"), payload
    parse_key(_text(data))


def headers(data: bytes) -> None:
    hs = parse_header_block(data)
    parse_tls_required(hs)
    for name, value in hs:
        if name.lower() == "subject":
            text, _ = decode_subject(value)
            find_cookie(text, "[requiretls]")
    decide(MessageFacts(Envelope("a@b.example", ("u@a.example", "v@c.example")), Session(None, "127.0.0.1"), hs),
           POLICY)


def mtasts(data: bytes) -> None:
    text = _text(data)
    with contextlib.suppress(MtaStsPolicyError):
        parse_policy(text)
    with contextlib.suppress(MtaStsRecordError):
        select_sts_record(text.split("\n"))


def table(data: bytes) -> None:
    for kind in ("destination", "sender"):
        with contextlib.suppress(ConfigError):
            PolicyTable.parse(_text(data), "policy", kind)  # type: ignore[arg-type]


def toml_config(data: bytes) -> None:
    with contextlib.suppress(ConfigError):
        config.parse(_text(data), "requiretls.toml")


def lmtp(data: bytes) -> None:
    strip_private(data)
    _take_params(_text(data), ("RET", "ENVID", "NOTIFY", "ORCPT"))


def front_commands(data: bytes) -> None:
    """The SMTP front: a command line, MAIL FROM parameters, and the same bytes as a message's lines."""
    for tls in (False, True):
        if front.command_error(data) is None:
            cmd = front.parse_command(data)
            m = front.mail_from(cmd, tls_active=tls)
            if m.requiretls and not tls:
                raise AssertionError("REQUIRETLS granted without TLS")
    s = front.DataStream()
    for ln in data.split(b"\n"):
        if ln != b".":
            s.line(ln)
    front.rewrite_ehlo(data, tls_active=True, tls_offered=True, auth_only=True)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "netstring": netstring, "socketmap": socketmap, "headers": headers, "mtasts": mtasts, "table": table,
    "config": toml_config, "lmtp": lmtp, "front": front_commands,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in [*TARGETS, "all"]:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(TARGETS)}|all}} [libFuzzer flags]")
    name, flags = sys.argv[1], sys.argv[2:]
    if name == "all":
        for t in TARGETS:
            print(f"== atheris {t}", flush=True)
            subprocess.run([sys.executable, __file__, t, *flags], check=True)
        return
    atheris.Setup([sys.argv[0], *flags], TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
