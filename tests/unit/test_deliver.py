"""Delivery agent outcomes that need no testbed: a connection cut during STARTTLS defers, never bounces."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from requiretls.addresses import NextHop
from requiretls.dest import Destination, DnssecState, MxHost, MxSource, TlsRequirement
from requiretls.dest.destination import DaneState
from requiretls.relay import agent
from requiretls.relay.deliver import DeliveryStatus, LmtpEnvelope, Outcome, SendSettings, deliver_requiretls


def _cutting_server() -> tuple[int, threading.Thread]:
    """Greets, offers STARTTLS, says 220 to it, then drops the connection in the middle of the handshake."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            f = conn.makefile("rwb")
            f.write(b"220 mx.cut.example ESMTP\r\n")
            f.flush()
            f.readline()  # EHLO
            f.write(b"250-mx.cut.example\r\n250 STARTTLS\r\n")
            f.flush()
            f.readline()  # STARTTLS
            f.write(b"220 go ahead\r\n")
            f.flush()
            conn.recv(10)  # the start of the ClientHello, then cut
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return port, t


def test_connection_cut_during_starttls_defers_instead_of_bouncing_5_7_10() -> None:
    """Found by the fault-injection run: "when in doubt, defer" (architecture, failure rules)."""
    port, t = _cutting_server()
    host = MxHost("mx.cut.example", 10, True, ("127.0.0.1",), DnssecState.SECURE, dane=DaneState.NONE)
    dest = Destination("cut.example", MxSource.MX, DnssecState.SECURE, (host,), None,
                       TlsRequirement.OPPORTUNISTIC, "test", 300)
    env = LmtpEnvelope("a@s.example", {}, ("b@cut.example",))
    out = deliver_requiretls(dest, env, env.rcpts, b"Subject: x\r\n\r\nbody\r\n",
                             SendSettings(helo_name="test.local", timeout=5, port=port))
    t.join(5)
    o = out["b@cut.example"]
    assert o.status is DeliveryStatus.DEFERRED and o.code == 451, o


class _HopResolver:
    """Records what the agent asked for: the relayhost as a next hop, never a recipient domain."""

    def __init__(self, dest: Destination) -> None:
        self.dest = dest
        self.asked: list[object] = []

    async def lookup(self, domain: str) -> Destination:
        self.asked.append(domain)
        return self.dest

    async def resolve(self, hop: NextHop) -> Destination:
        self.asked.append(hop)
        return self.dest


@pytest.mark.parametrize(
    ("relayhost", "port"),
    [("[smart.example]:587", 587), ("[smart.example]", 25), ("relay.example", 25), ("relay.example:2525", 2525)],
)
def test_agent_sends_to_the_relayhost_next_hop_on_its_port(monkeypatch: pytest.MonkeyPatch, relayhost: str,
                                                           port: int) -> None:
    hop = NextHop.parse(relayhost)
    dest = Destination(hop.host, MxSource.MX, DnssecState.SECURE, (), None, TlsRequirement.OPPORTUNISTIC, "x", 60)
    sent: list[tuple[Destination, SendSettings]] = []

    def fake_send(d: Destination, env: LmtpEnvelope, rcpts: list[str], message: bytes,
                  settings: SendSettings) -> dict[str, Outcome]:
        sent.append((d, settings))
        return dict.fromkeys(rcpts, Outcome(DeliveryStatus.SENT, 250, "2.0.0", "ok"))

    monkeypatch.setattr(agent, "deliver_requiretls", fake_send)
    resolver = _HopResolver(dest)
    settings = agent.AgentSettings(relayhost=hop)
    handler = agent.AgentHandler(resolver, agent.AgentState(settings))  # type: ignore[arg-type]
    env = LmtpEnvelope("a@s.example", {}, ("b@rcpt.example",))
    target = agent._target("b@rcpt.example", "", settings.relayhost)  # no plan from the milter: the relayhost
    assert target == hop
    out = asyncio.run(handler._deliver(target, env, ["b@rcpt.example"], b"Subject: x\r\n\r\n", False,
                                       settings))
    assert out["b@rcpt.example"].status is DeliveryStatus.SENT
    assert resolver.asked == [hop]  # the parsed next hop itself: [host] and host stay different hops
    assert sent == [(dest, SendSettings(port=port))]
