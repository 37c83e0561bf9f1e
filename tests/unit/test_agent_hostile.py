"""The delivery agent's LMTP server under hostile input (issue 17), over a real socket: invalid bytes in
MAIL FROM / RCPT TO get 501, contradictory private header fields defer and are never followed."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest

from requiretls.relay import agent
from requiretls.relay.deliver import DeliveryStatus, Outcome


class _NoResolver:
    async def lookup(self, domain: str) -> object:
        raise AssertionError("the agent must not look anything up for this message")

    async def resolve(self, hop: object) -> object:
        raise AssertionError("the agent must not look anything up for this message")


@pytest.fixture
def lmtp(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, list[str]]]:
    """The agent's LMTP server on a loopback port; yields (port, recipients any delivery was attempted for)."""
    tried: list[str] = []

    def record(*args: object) -> dict[str, Outcome]:
        rcpts = args[2]
        assert isinstance(rcpts, list)
        tried.extend(rcpts)
        return dict.fromkeys(rcpts, Outcome(DeliveryStatus.SENT, 250, "2.0.0", "ok"))

    monkeypatch.setattr(agent, "deliver_opportunistic", record)
    monkeypatch.setattr(agent, "deliver_requiretls", record)
    handler = agent.AgentHandler(_NoResolver(), agent.AgentState())  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    def factory() -> agent.AgentLMTP:
        return agent.AgentLMTP(handler, enable_SMTPUTF8=True, decode_data=False, ident="test", data_size_limit=0)

    server = loop.run_until_complete(loop.create_server(factory, sock=sock))
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        yield port, tried
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)


def _talk(port: int, *lines: bytes, last: int = 1) -> list[bytes]:
    """Send raw LMTP lines (after LHLO); the reply line to each, ``last`` lines to the last one (LMTP answers
    DATA once per recipient)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"LHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        out = []
        for line in lines:
            s.sendall(line + b"\r\n")
            out.append(f.readline().rstrip(b"\r\n"))
        out += [f.readline().rstrip(b"\r\n") for _ in range(last - 1)]
        return out


@pytest.mark.parametrize("addr", [b"<a\x00@b.example>", b"<caf\xe9@b.example>", b"<a\x7f@b.example>",
                                  b"<a@b.example> RET=\x01HDRS", b"<a\xc2\x85@b.example>"])
def test_invalid_bytes_in_mail_from_get_501(lmtp: tuple[int, list[str]], addr: bytes) -> None:
    (reply,) = _talk(lmtp[0], b"MAIL FROM:" + addr)
    assert reply.startswith(b"501 5.1.7"), reply


@pytest.mark.parametrize("addr", [b"<b\x00@c.example>", b"<b\xff@c.example>", b"<b\x1b@c.example>"])
def test_invalid_bytes_in_rcpt_to_get_501(lmtp: tuple[int, list[str]], addr: bytes) -> None:
    mail, rcpt = _talk(lmtp[0], b"MAIL FROM:<a@b.example>", b"RCPT TO:" + addr)
    assert mail.startswith(b"250") and rcpt.startswith(b"501 5.1.3"), (mail, rcpt)


def test_utf8_addresses_are_still_accepted(lmtp: tuple[int, list[str]]) -> None:
    mail, rcpt = _talk(lmtp[0], "MAIL FROM:<café@b.example> SMTPUTF8".encode(), "RCPT TO:<jörg@c.example>".encode())
    assert mail.startswith(b"250") and rcpt.startswith(b"250"), (mail, rcpt)


@pytest.mark.parametrize("fields", [
    [b"X-RequireTLS-Route: relay-optout", b"X-RequireTLS-Route: relay"],  # forged first (issue 17)
    [b"X-RequireTLS-Route: relay", b"X-RequireTLS-Route: relay-optout"],
    [b"X-RequireTLS-Route: relay", b"X-RequireTLS-Handback: <b@c.example>", b"X-RequireTLS-Handback: <x@y>"],
    [b"X-RequireTLS-Route: relay", b"X-RequireTLS-Nexthop: <b@c.example> [evil.example]",
     b"X-RequireTLS-Nexthop: <b@c.example> [mx.c.example]"],
])
def test_contradictory_private_fields_defer_and_nothing_is_delivered(lmtp: tuple[int, list[str]],
                                                                     fields: list[bytes]) -> None:
    port, tried = lmtp
    msg = b"\r\n".join([*fields, b"Subject: x", b"", b"body", b"."])
    replies = _talk(port, b"MAIL FROM:<a@b.example>", b"RCPT TO:<b@c.example>", b"RCPT TO:<d@c.example>",
                    b"DATA", msg, last=2)
    assert replies[3].startswith(b"354"), replies
    assert replies[4].startswith(b"451 4.3.0") and replies[5].startswith(b"451 4.3.0"), replies
    assert tried == []
