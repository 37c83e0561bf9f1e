"""The agent on the wire against a real SMTP server on loopback (aiosmtpd): SASL AUTH only over verified TLS,
replies about our own standing (530/535, a refused EHLO) defer instead of bouncing, the bind address."""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from requiretls.dest import Destination, DnssecState, MxHost, MxSource, TlsRequirement
from requiretls.dest.destination import DaneState
from requiretls.dest.session import pkix_context
from requiretls.relay.deliver import (
    DeliveryStatus,
    LmtpEnvelope,
    SaslCredentials,
    SendSettings,
    SessionCache,
    deliver_opportunistic,
    deliver_requiretls,
)
from tests.dest.support import TestCA, server_context
from tests.testbed.relay_server import RelayOptions, RelayServer

NAME = "relay.test"
MESSAGE = b"From: a@s.example\r\nTo: b@r.example\r\nSubject: x\r\n\r\nbody line\r\n"
ENV = LmtpEnvelope("a@s.example", {}, ("b@r.example",))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def cafile(ca: TestCA, tmp_path: Path) -> str:
    return ca.write_root(tmp_path / "root.pem")


def _dest(port_host: str = "127.0.0.1") -> Destination:
    """A configured next hop (relayhost = [relay.test]:PORT): PKIX, as DestinationResolver.nexthop builds it."""
    host = MxHost(NAME, 0, True, (port_host,), DnssecState.SECURE, dane=DaneState.NONE)
    return Destination(NAME, MxSource.MX, DnssecState.SECURE, (host,), None, TlsRequirement.OPPORTUNISTIC,
                       "configured next hop", 300)


@pytest.fixture
def relay(ca: TestCA, tmp_path: Path) -> Iterator[RelayServer]:
    ctx = server_context(tmp_path, ca.leaf(NAME))
    with RelayServer(ctx, "127.0.0.1", _free_port(), RelayOptions(users={"agent": "s3cret"}), NAME) as r:
        yield r


def _settings(relay: RelayServer, cafile: str, **kw: object) -> SendSettings:
    return SendSettings(port=relay.controller.port, timeout=5, cafile=cafile, helo_name="out.example", **kw)  # type: ignore[arg-type]


def test_sasl_auth_over_verified_tls_delivers_with_requiretls(relay: RelayServer, cafile: str) -> None:
    out = deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, _settings(relay, cafile),
                             {NAME: SaslCredentials("agent", "s3cret")})
    assert out["b@r.example"].status is DeliveryStatus.SENT, out
    (d,) = relay.deliveries
    assert d.auth_user == "agent" and d.tls and d.requiretls and d.helo == "out.example"
    assert relay.auth_attempts and relay.auth_attempts[0][0] == "PLAIN"


def test_auth_required_without_credentials_defers_not_bounces(relay: RelayServer, cafile: str) -> None:
    out = deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, _settings(relay, cafile))
    o = out["b@r.example"]
    assert o.status is DeliveryStatus.DEFERRED and o.code == 454 and o.dsn == "4.7.0", o
    assert "530" in o.text
    assert relay.deliveries == []


def test_wrong_password_defers_not_bounces(relay: RelayServer, cafile: str) -> None:
    out = deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, _settings(relay, cafile),
                             {NAME: SaslCredentials("agent", "wrong")})
    o = out["b@r.example"]
    assert o.status is DeliveryStatus.DEFERRED and o.code == 454 and o.dsn.startswith("4."), o
    assert "535" in o.text and "wrong" not in o.text
    assert relay.deliveries == []


def test_opt_out_mail_sends_no_password_over_unverified_tls(relay: RelayServer, tmp_path: Path) -> None:
    """TLS-Required: No to a relay whose certificate does not verify: no AUTH (the password would go to
    whoever answers), the relay's 530 defers."""
    other = TestCA("another root").write_root(tmp_path / "other.pem")
    hosts = [(NAME, ("127.0.0.1",))]
    out = deliver_opportunistic(hosts, ENV, ENV.rcpts, MESSAGE, _settings(relay, other),
                                {NAME: SaslCredentials("agent", "s3cret")})
    o = out["b@r.example"]
    assert o.status is DeliveryStatus.DEFERRED, o
    assert relay.auth_attempts == [] and relay.deliveries == []


def test_opt_out_mail_authenticates_over_verified_tls(relay: RelayServer, cafile: str) -> None:
    hosts = [(NAME, ("127.0.0.1",))]
    out = deliver_opportunistic(hosts, ENV, ENV.rcpts, MESSAGE, _settings(relay, cafile),
                                {NAME: SaslCredentials("agent", "s3cret")})
    assert out["b@r.example"].status is DeliveryStatus.SENT, out
    (d,) = relay.deliveries
    assert d.auth_user == "agent" and not d.requiretls


def test_bind_address_is_the_source_of_the_connection(ca: TestCA, tmp_path: Path, cafile: str) -> None:
    ctx = server_context(tmp_path, ca.leaf(NAME))
    with RelayServer(ctx, "127.0.0.1", _free_port(), RelayOptions(), NAME) as r:
        out = deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, _settings(r, cafile, bind_address="127.0.0.7"))
        assert out["b@r.example"].status is DeliveryStatus.SENT, out
        assert r.deliveries[0].peer == "127.0.0.7"


def _refusing_server(greeting: bytes, ehlo: bytes) -> tuple[int, threading.Thread]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = int(srv.getsockname()[1])

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            f = conn.makefile("rwb")
            f.write(greeting)
            f.flush()
            if greeting.startswith(b"220"):
                f.readline()
                f.write(ehlo)
                f.flush()
                f.readline()  # HELO fallback or QUIT
                f.write(ehlo)
                f.flush()
                f.readline()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return port, t


@pytest.mark.parametrize(("greeting", "ehlo"), [
    (b"554 5.7.1 you are blocked\r\n", b""),
    (b"220 relay.test ESMTP\r\n", b"554 5.7.1 your EHLO is refused\r\n"),
])
def test_refused_greeting_or_ehlo_defers(greeting: bytes, ehlo: bytes, cafile: str) -> None:
    port, t = _refusing_server(greeting, ehlo)
    out = deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE,
                             SendSettings(port=port, timeout=5, cafile=cafile, helo_name="out.example"))
    t.join(5)
    o = out["b@r.example"]
    assert o.status is DeliveryStatus.DEFERRED and o.code < 500, o


# --- RFC 6152 / 6531 / 1870 on the wire ------------------------------------------------------------------

EIGHT_BIT = ("From: a@s.example\r\nTo: b@r.example\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
             "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
             "Grüße aus Köln\r\n.a dot line\r\ntrailing space \r\n").encode()


def _plain_mx(ca: TestCA, tmp_path: Path, **options: object) -> RelayServer:
    return RelayServer(server_context(tmp_path, ca.leaf(NAME)), "127.0.0.1", _free_port(),
                       RelayOptions(**options), NAME)  # type: ignore[arg-type]


def _decoded(raw: bytes) -> list[tuple[str, bytes | None]]:
    import email
    import email.policy

    msg = email.message_from_bytes(raw, policy=email.policy.default)
    return [(p.get_content_type(), p.get_payload(decode=True)) for p in msg.walk() if not p.is_multipart()]


def test_8bit_message_to_mx_without_8bitmime_is_sent_quoted_printable(ca: TestCA, tmp_path: Path,
                                                                       cafile: str) -> None:
    env = LmtpEnvelope("a@s.example", {"BODY": "8BITMIME"}, ("b@r.example",))
    with _plain_mx(ca, tmp_path, eightbitmime=False) as mx:
        out = deliver_requiretls(_dest(), env, env.rcpts, EIGHT_BIT, _settings(mx, cafile))
        assert out["b@r.example"].status is DeliveryStatus.SENT, out
        (d,) = mx.deliveries
    assert not any(b > 127 for b in d.raw), d.raw  # 7-bit clean on the wire
    assert not any(o.upper().startswith("BODY=") for o in d.mail_options)
    assert b"Content-Transfer-Encoding: quoted-printable" in d.raw
    assert _decoded(d.raw) == _decoded(EIGHT_BIT)


def test_8bit_message_to_mx_with_8bitmime_is_sent_unchanged(ca: TestCA, tmp_path: Path, cafile: str) -> None:
    env = LmtpEnvelope("a@s.example", {"BODY": "8BITMIME"}, ("b@r.example",))
    with _plain_mx(ca, tmp_path) as mx:
        deliver_requiretls(_dest(), env, env.rcpts, EIGHT_BIT, _settings(mx, cafile))
        (d,) = mx.deliveries
    assert d.raw == EIGHT_BIT and "BODY=8BITMIME" in d.mail_options


def test_signed_8bit_message_to_mx_without_8bitmime_bounces_5_6_3(ca: TestCA, tmp_path: Path, cafile: str) -> None:
    signed = ("From: a@s.example\r\nMIME-Version: 1.0\r\n"
              "Content-Type: multipart/signed; protocol=\"application/pgp-signature\"; boundary=\"b1\"\r\n\r\n"
              "--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nsigné\r\n"
              "--b1\r\nContent-Type: application/pgp-signature\r\n\r\nSIG\r\n--b1--\r\n").encode()
    env = LmtpEnvelope("a@s.example", {"BODY": "8BITMIME"}, ("b@r.example",))
    with _plain_mx(ca, tmp_path, eightbitmime=False) as mx:
        out = deliver_requiretls(_dest(), env, env.rcpts, signed, _settings(mx, cafile))
        assert mx.deliveries == []
    o = out["b@r.example"]
    assert o.status is DeliveryStatus.BOUNCED and o.dsn == "5.6.3", o


def test_smtputf8_message_to_mx_without_smtputf8_bounces_5_6_7(ca: TestCA, tmp_path: Path, cafile: str) -> None:
    env = LmtpEnvelope("a@s.example", {"SMTPUTF8": "", "BODY": "8BITMIME"}, ("b@r.example",))
    with _plain_mx(ca, tmp_path, smtputf8=False) as mx:
        out = deliver_requiretls(_dest(), env, env.rcpts, EIGHT_BIT, _settings(mx, cafile))
        assert mx.deliveries == []
    o = out["b@r.example"]
    assert o.status is DeliveryStatus.BOUNCED and o.dsn == "5.6.7", o


def test_message_over_the_mx_size_bounces_5_3_4_without_sending(ca: TestCA, tmp_path: Path, cafile: str) -> None:
    big = MESSAGE + b"x" * 5000 + b"\r\n"
    with _plain_mx(ca, tmp_path, size=2000) as mx:
        out = deliver_requiretls(_dest(), ENV, ENV.rcpts, big, _settings(mx, cafile))
        assert mx.deliveries == []
    o = out["b@r.example"]
    assert o.status is DeliveryStatus.BOUNCED and o.dsn == "5.3.4" and o.code == 552, o


def _sent_each(n: int, s: SendSettings, cache: SessionCache) -> None:
    """``n`` deliveries of the test message through ``cache``, each sent."""
    for _ in range(n):
        out = deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, s, None, cache)
        assert out["b@r.example"].status is DeliveryStatus.SENT, out


def test_sessions_are_reused_and_closed_when_idle(ca: TestCA, tmp_path: Path, cafile: str) -> None:
    """Postfix-like connection cache: the second message to the same MX goes over the first one's session (no
    RSET needed after a completed transaction); an idle session is closed."""
    cache = SessionCache(idle=0.5)
    with _plain_mx(ca, tmp_path) as mx:
        s = _settings(mx, cafile)
        _sent_each(3, s, cache)
        assert len(mx.deliveries) == 3 and cache.reused == 2
        assert len({d.peer_port for d in mx.deliveries}) == 1
        assert mx.rsets == 0
        end = time.monotonic() + 10  # idle 0.5 s, and the janitor looks every 0.25 s
        while cache._free and time.monotonic() < end:
            time.sleep(0.05)
        assert cache.prune(everything=True) == 0  # the janitor closed it already
        deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, s, None, cache)
        assert cache.reused == 2 and len({d.peer_port for d in mx.deliveries}) == 2


def test_a_session_the_mx_closed_is_replaced(ca: TestCA, tmp_path: Path, cafile: str) -> None:
    cache = SessionCache(idle=30)
    with _plain_mx(ca, tmp_path) as mx:
        s = _settings(mx, cafile)
        deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, s, None, cache)
        for (client, _r, _b, _i) in next(iter(cache._free.values())):
            client.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]  # as if the MX had dropped it
        out = deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, s, None, cache)
        assert out["b@r.example"].status is DeliveryStatus.SENT, out
        assert len(mx.deliveries) == 2 and cache.reused == 0


def test_outbound_sessions_send_without_nagle_delay(ca: TestCA, tmp_path: Path, cafile: str) -> None:
    """smtplib writes the message's end and each command on its own: with Nagle's algorithm each such small write
    waited for the MX's delayed ACK (40 ms), and one session carried 22 messages a second instead of 540
    (bench/agent_offline.py --sessions 1)."""
    cache = SessionCache(idle=30)
    with _plain_mx(ca, tmp_path) as mx:
        deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, _settings(mx, cafile), None, cache)
        ((client, _r, _b, _i),) = next(iter(cache._free.values()))
        assert client.sock is not None
        assert client.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        cache.prune(everything=True)


def test_a_kept_session_refused_with_421_at_mail_is_replaced(ca: TestCA, tmp_path: Path, cafile: str) -> None:
    """No RSET before reuse: an MX that says 421 to the next MAIL on a kept session (and closes it) is met by a
    new session for the same message, not by a deferral."""
    cache = SessionCache(idle=30)
    with _plain_mx(ca, tmp_path, one_transaction=True) as mx:
        _sent_each(2, _settings(mx, cafile), cache)
        assert len(mx.deliveries) == 2 and cache.reused == 0
        assert len({d.peer_port for d in mx.deliveries}) == 2


def test_ca_directory_alone_verifies_the_relay(relay: RelayServer, ca: TestCA, tmp_path: Path) -> None:
    """smtp_tls_CApath: the root only in a hashed CA directory (openssl rehash) is enough for PKIX; without it
    the same relay does not verify and nothing is sent."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs openssl rehash")
    capath = tmp_path / "certs"
    capath.mkdir()
    ca.write_root(capath / "root.pem")
    subprocess.run(["openssl", "rehash", str(capath)], check=True, capture_output=True)
    creds = {NAME: SaslCredentials("agent", "s3cret")}
    base = SendSettings(port=relay.controller.port, timeout=5, helo_name="out.example")
    out = deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, base, creds)
    assert out["b@r.example"].status is not DeliveryStatus.SENT and relay.deliveries == [], out
    out = deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, replace(base, capath=str(capath)), creds)
    assert out["b@r.example"].status is DeliveryStatus.SENT, out
    assert "verify=pkix" in out["b@r.example"].text


def _tls12_mx(ca: TestCA, tmp_path: Path) -> RelayServer:
    ctx = server_context(tmp_path, ca.leaf(NAME))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return RelayServer(ctx, "127.0.0.1", _free_port(), RelayOptions(), NAME)


def test_postfix_protocol_floor_raises_the_agents(ca: TestCA, tmp_path: Path, cafile: str) -> None:
    """smtp_tls_mandatory_protocols = >=TLSv1.3: an MX that stops at TLS 1.2 does not get the message; the
    agent's own floor (1.2) delivers it."""
    with _tls12_mx(ca, tmp_path) as mx:
        s = _settings(mx, cafile)
        out = deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, replace(s, tls_min_version="TLSv1.3"))
        assert out["b@r.example"].status is not DeliveryStatus.SENT and mx.deliveries == [], out
        out = deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, s)
        assert out["b@r.example"].status is DeliveryStatus.SENT and out["b@r.example"].tls == "TLSv1.2", out
        # A weaker request never lowers the agent's floor below TLS 1.2.
        assert pkix_context(replace(s, tls_min_version="TLSv1")).minimum_version == ssl.TLSVersion.TLSv1_2


def test_high_ciphers_only_remove_suites(cafile: str) -> None:
    default = {c["name"] for c in pkix_context(SendSettings(cafile=cafile)).get_ciphers()}
    high = {c["name"] for c in pkix_context(SendSettings(cafile=cafile, high_ciphers=True)).get_ciphers()}
    assert high and high <= default


@pytest.mark.parametrize("tls_max", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_session_resumed_on_a_new_connection_only_under_the_same_trust(ca: TestCA, tmp_path: Path,
                                                                          cafile: str, tls_max: ssl.TLSVersion) -> None:
    """A new connection to the same MX resumes the TLS session of the last one (TLS 1.2 session id or 1.3
    ticket), checked with the server's real ``session_reused``; a handshake under other verification
    parameters (another CA file) never gets it."""
    ctx = server_context(tmp_path, ca.leaf(NAME))
    ctx.maximum_version = tls_max
    cache = SessionCache(idle=30)
    other_ca = ca.write_root(tmp_path / "same-root-other-file.pem")
    with RelayServer(ctx, "127.0.0.1", _free_port(), RelayOptions(), NAME) as mx:
        s = _settings(mx, cafile)
        for i in range(3):
            out = deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, s, None, cache)
            assert out["b@r.example"].status is DeliveryStatus.SENT, out
            cache.prune(everything=True)  # no connection kept: the next message makes a new one
            assert cache.tls.resumed == i
        out = deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, replace(s, cafile=other_ca), None, cache)
        assert out["b@r.example"].status is DeliveryStatus.SENT and cache.tls.resumed == 2, out
        assert len({d.peer_port for d in mx.deliveries}) == 4  # four connections, two of them resumed


def test_mandatory_floor_does_not_push_opt_out_mail_to_plaintext(ca: TestCA, tmp_path: Path, cafile: str) -> None:
    """TLS-Required: No is opportunistic TLS: smtp_tls_mandatory_protocols does not apply, so a TLS 1.2-only MX
    still gets TLS 1.2 rather than plaintext."""
    with _tls12_mx(ca, tmp_path) as mx:
        s = replace(_settings(mx, cafile), tls_min_version="TLSv1.3", high_ciphers=True)
        out = deliver_opportunistic([(NAME, ["127.0.0.1"])], ENV, ENV.rcpts, MESSAGE, s)
        assert out["b@r.example"].status is DeliveryStatus.SENT and out["b@r.example"].tls == "TLSv1.2", out
        assert mx.deliveries[0].tls


def test_opportunistic_floor_from_smtp_tls_protocols_falls_back_to_plaintext(ca: TestCA, tmp_path: Path,
                                                                              cafile: str) -> None:
    """smtp_tls_protocols = >=TLSv1.3 is the floor of opportunistic sessions (as Postfix's `may`): a TLS
    1.2-only MX gets opt-out mail in plaintext, as Postfix's own client would send it."""
    with _tls12_mx(ca, tmp_path) as mx:
        s = replace(_settings(mx, cafile), opportunistic_min_version="TLSv1.3")
        out = deliver_opportunistic([(NAME, ["127.0.0.1"])], ENV, ENV.rcpts, MESSAGE, s)
        assert out["b@r.example"].status is DeliveryStatus.SENT, out
        assert not mx.deliveries[0].tls


def test_contexts_made_at_once_by_many_threads_are_one(cafile: str) -> None:
    """The bench found it: 20 first deliveries at once built two contexts for the same parameters; a TLS session
    of one offered on the other was refused after the socket was detached (EBADF), and the message bounced."""
    from concurrent.futures import ThreadPoolExecutor

    from requiretls.dest import session as sess

    s = SendSettings(cafile=cafile, tls_min_version="TLSv1.3", capath=None, port=2)
    with ThreadPoolExecutor(20) as pool:
        made = list(pool.map(lambda _: id(pkix_context(s)), range(40)))
    assert len(set(made)) == 1
    assert sess.unverified_context(s) is sess.unverified_context(replace(s, cafile=None))


def _starttls_in_clear(sock: socket.socket) -> None:
    """EHLO and STARTTLS, pipelined, and their replies read to the end of the 220 (the server sends nothing
    more until the client's hello, so nothing of the handshake is read here)."""
    sock.sendall(b"EHLO x\r\nSTARTTLS\r\n")
    got = b""
    while not re.search(rb"(^|\n)220 [^\n]*\n", got):
        chunk = sock.recv(4000)
        assert chunk, got
        got += chunk


def test_a_session_of_another_context_is_not_offered_and_the_handshake_goes_on(ca: TestCA, tmp_path: Path,
                                                                               cafile: str) -> None:
    from requiretls.dest.session import _Resuming

    ctx = server_context(tmp_path, ca.leaf(NAME))
    with RelayServer(ctx, "127.0.0.1", _free_port(), RelayOptions(), NAME) as mx:
        out = deliver_requiretls(_dest(), ENV, ENV.rcpts, MESSAGE, _settings(mx, cafile))
        assert out["b@r.example"].status is DeliveryStatus.SENT
        other = ssl.create_default_context(cafile=cafile)
        first = socket.create_connection(("127.0.0.1", mx.controller.port))
        first.recv(1000)
        _starttls_in_clear(first)
        t = other.wrap_socket(first, server_hostname=NAME)
        t.sendall(b"EHLO x\r\n")
        t.recv(4000)
        foreign = t.session
        t.close()
        second = socket.create_connection(("127.0.0.1", mx.controller.port))
        second.recv(1000)
        _starttls_in_clear(second)
        tls = _Resuming(pkix_context(cafile), foreign).wrap_socket(second, server_hostname=NAME)
        assert tls.version() and not tls.session_reused
        tls.close()
