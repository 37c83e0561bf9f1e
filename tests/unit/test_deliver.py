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
                  settings: SendSettings, *_: object) -> dict[str, Outcome]:
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


def test_a_list_of_next_hops_is_tried_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """relayhost = [a], [b] (Postfix 3.5+): a hop that cannot qualify (5.7.30) or answers 4xx passes the
    recipient on to the next; the first hop that takes it wins; a server's own 5xx is final; with no taker a
    deferral wins over a policy bounce."""
    replies = {
        "a.example": Outcome(DeliveryStatus.BOUNCED, 550, "5.7.30", "no REQUIRETLS", requiretls=False),
        "b.example": Outcome(DeliveryStatus.DEFERRED, 451, "4.4.1", "timeout"),
        "c.example": Outcome(DeliveryStatus.SENT, 250, "2.0.0", "ok"),
        "d.example": Outcome(DeliveryStatus.BOUNCED, 550, "5.1.1", "no such user"),
    }

    def fake_send(d: Destination, env: LmtpEnvelope, rcpts: list[str], message: bytes,
                  settings: SendSettings, *_: object) -> dict[str, Outcome]:
        return dict.fromkeys(rcpts, replies[d.domain])

    class _ByHop(_HopResolver):
        async def resolve(self, hop: NextHop) -> Destination:
            self.asked.append(hop)
            return Destination(hop.host, MxSource.MX, DnssecState.SECURE, (), None, TlsRequirement.DANE, "x", 60)

    monkeypatch.setattr(agent, "deliver_requiretls", fake_send)

    def run(planned: str) -> tuple[Outcome, list[object]]:
        resolver = _ByHop(None)  # type: ignore[arg-type]
        handler = agent.AgentHandler(resolver, agent.AgentState())  # type: ignore[arg-type]
        target = agent._target("r@x.example", planned, None)
        assert isinstance(target, tuple)
        env = LmtpEnvelope("a@s.example", {}, ("r@x.example",))
        out = asyncio.run(handler._deliver(target, env, ["r@x.example"], b"Subject: x\r\n\r\n", False,
                                           agent.AgentSettings()))
        return out["r@x.example"], resolver.asked

    got, asked = run("[a.example]|[b.example]|[c.example]|[d.example]")
    assert got.status is DeliveryStatus.SENT and len(asked) == 3  # d never tried
    got, asked = run("[a.example]|[d.example]|[c.example]")
    assert got.dsn == "5.1.1" and len(asked) == 2  # the server's own 5xx is final
    got, _ = run("[a.example]|[b.example]")
    assert got.status is DeliveryStatus.DEFERRED  # may find a hop later
    got, _ = run("[a.example]|[a.example]:2525")
    assert got.dsn == "5.7.30"


def test_per_destination_concurrency_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """No more than destination_concurrency deliveries run at once to one destination."""
    import time as _time

    running = [0]
    peak = [0]
    host = MxHost("mx.x.example", 10, True, ("127.0.0.1",), DnssecState.SECURE, dane=DaneState.NONE)
    dest = Destination("x.example", MxSource.MX, DnssecState.SECURE, (host,), None, TlsRequirement.OPPORTUNISTIC,
                       "test", 300)

    def slow_send(d: Destination, env: LmtpEnvelope, rcpts: list[str], message: bytes,
                  settings: SendSettings, *_: object) -> dict[str, Outcome]:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        _time.sleep(0.05)
        running[0] -= 1
        return dict.fromkeys(rcpts, Outcome(DeliveryStatus.SENT, 250, "2.0.0", "ok"))

    monkeypatch.setattr(agent, "deliver_requiretls", slow_send)
    handler = agent.AgentHandler(_HopResolver(dest), agent.AgentState(agent.AgentSettings(  # type: ignore[arg-type]
        destination_concurrency=3)))
    env = LmtpEnvelope("a@s.example", {}, ("b@x.example",))

    async def many() -> None:
        await asyncio.gather(*(handler._deliver("x.example", env, ["b@x.example"], b"m", False, handler.settings)
                               for _ in range(12)))

    asyncio.run(many())
    assert peak[0] == 3
