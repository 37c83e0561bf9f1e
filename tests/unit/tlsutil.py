"""TLS contexts for unit tests that need a real handshake on loopback: the testbed's CA and its Postfix
certificate, made once per test session in a temporary directory."""

from __future__ import annotations

import functools
import ssl
import tempfile
from pathlib import Path

from tests.testbed.pki import Pki, make_pki


@functools.cache
def pki() -> Pki:
    return make_pki(Path(tempfile.mkdtemp(prefix="rtls-unit-pki-")))


def server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    files = pki().files("postfix")
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(pki().ca_cert))
    return ctx
