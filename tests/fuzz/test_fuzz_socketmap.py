"""Netstring framing and socketmap requests (socketmap_table(5)): whatever a client sends, the server answers
with one well-formed netstring per request or closes the connection, and never raises."""

from __future__ import annotations

import asyncio
import random

from hypothesis import given
from hypothesis import strategies as st

from requiretls.policy.table import PolicyTable
from requiretls.policy.tlsmap import Answer, Query, parse_key
from requiretls.policyd.metrics import Metrics
from requiretls.policyd.netstring import Decoder, NetstringError, encode
from requiretls.policyd.server import MAX_REQUEST, PolicyService, ServiceSettings, SocketmapProtocol
from tests.policyd.fakes import FakeResolver, dane, deferred, plain, sts

from .support import FUZZ, SEPARATORS, tokens

STATUSES = (b"OK ", b"NOTFOUND ", b"TEMP ", b"PERM ")
KEY_WORDS = ["default", "strict", "optout", "postfix", "a.example", ".example", "dane.example", "[", "]", ":25",
             "sts.example", "bogus.example", "broken.example", "mx.", "xn--", "..", "-", "_", "9", "A", *SEPARATORS]
TABLE = PolicyTable.parse("bank.example dane-only optout=no\n.gov.example secure requiretls=yes\n"
                          "[relay.example]:587 encrypt\nnews.example may\n", "policy")
DESTS: dict[str, object] = {
    "dane.example": dane("dane.example"), "sts.example": sts("sts.example"), "plain.example": plain("plain.example"),
    "bogus.example": deferred("bogus.example"), "broken.example": RuntimeError("boom"),
    "gone.example": OSError("unreachable"),
}
METRICS = Metrics()
LOOP = asyncio.new_event_loop()


def _split(data: bytes, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rnd.choice([1, 2, 3, 7, 64, 4096])
        out.append(data[i : i + n])
        i += n
    return out


def _reference(stream: bytes, limit: int) -> tuple[list[bytes], bool]:
    """Payloads of the complete netstrings at the start of ``stream`` and whether it then goes bad."""
    out, pos = [], 0
    while pos < len(stream):
        colon = stream.find(b":", pos)
        digits = stream[pos:colon] if colon >= 0 else stream[pos:]
        if colon < 0:
            ok = digits.isdigit() and len(digits) <= len(str(limit))
            return out, not ok
        if not digits.isdigit() or (len(digits) > 1 and digits[:1] == b"0") or int(digits) > limit:
            return out, True
        end = colon + 1 + int(digits)
        if end >= len(stream):
            return out, False
        if stream[end : end + 1] != b",":
            return out, True
        out.append(stream[colon + 1 : end])
        pos = end + 1
    return out, False


netstring_streams = st.one_of(
    st.binary(max_size=300),
    st.lists(st.binary(max_size=40).map(encode), max_size=6).map(b"".join),
    st.lists(st.one_of(st.binary(max_size=30).map(encode), st.sampled_from(
        [b"0:,", b"01:a,", b"3:ab", b"99999:", b"2049:", b":", b",", b"-1:", b"1:a;", b" 1:a,", b"1 :a,"]
    )), max_size=6).map(b"".join),
)


@FUZZ
@given(netstring_streams, st.integers(0, 2**32), st.sampled_from([0, 5, 64, 2048]))
def test_decoder_yields_exactly_the_reference_payloads_or_a_netstring_error(data: bytes, seed: int, limit: int) -> None:
    dec = Decoder(limit)
    got: list[bytes] = []
    failed = False
    for chunk in _split(data, seed):
        try:
            got += dec.feed(chunk)
        except NetstringError:
            failed = True
            break
    want, bad = _reference(data, limit)
    assert got == want[: len(got)]
    if failed:
        assert bad
    else:
        assert got == want and not bad


@FUZZ
@given(st.lists(st.binary(max_size=2048), max_size=5), st.integers(0, 2**32))
def test_encoded_payloads_come_back_whole_in_order_whatever_the_read_sizes(payloads: list[bytes], seed: int) -> None:
    dec = Decoder(2048)
    got: list[bytes] = []
    for chunk in _split(b"".join(map(encode, payloads)), seed):
        got += dec.feed(chunk)
    assert got == payloads and dec.pending == 0


@FUZZ
@given(st.one_of(st.text(max_size=320), tokens(KEY_WORDS)))
def test_parse_key_returns_a_query_or_perm(raw: str) -> None:
    q = parse_key(raw)
    if isinstance(q, Answer):
        assert q.wire().startswith("PERM ")
    else:
        assert isinstance(q, Query) and q.key == raw.lower() and q.key.isascii() and " " not in q.key


def _check_reply(wire: bytes) -> None:
    (payload,) = Decoder(100_000).feed(wire)
    assert payload.startswith(STATUSES), payload
    assert payload.isascii() and b"\n" not in payload and b"\r" not in payload


def _service() -> PolicyService:
    return PolicyService(TABLE, FakeResolver(DESTS), METRICS, ServiceSettings(answer_ttl=60, lookup_timeout=2))


@FUZZ
@given(st.one_of(st.binary(max_size=300), tokens(KEY_WORDS).map(lambda s: s.encode("utf-8", "surrogatepass"))))
def test_service_reply_is_one_well_formed_answer_for_any_request(request: bytes) -> None:
    service = _service()
    _check_reply(LOOP.run_until_complete(service.reply(request)))
    _check_reply(LOOP.run_until_complete(service.reply(request)))  # the cached path too


class _Transport:
    """Like asyncio's: writes after close() are dropped, connection_lost() follows close() on the loop."""

    def __init__(self, proto: SocketmapProtocol) -> None:
        self.proto = proto
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.out += data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.proto.connection_lost, None)

    def get_extra_info(self, name: str) -> None:
        return None


class _Server:
    def __init__(self) -> None:
        self.connections: set[SocketmapProtocol] = set()


request_streams = st.one_of(
    st.binary(max_size=400),
    st.lists(tokens(KEY_WORDS).map(lambda s: encode(s.encode("utf-8", "surrogatepass"))), max_size=6).map(b"".join),
    st.just(encode(b"default " + b"a" * MAX_REQUEST)),
)


@FUZZ
@given(request_streams, st.integers(0, 2**32))
def test_connection_answers_every_complete_request_in_order_or_closes(stream: bytes, seed: int) -> None:
    service = _service()
    proto = SocketmapProtocol(service, _Server())  # type: ignore[arg-type]
    transport = _Transport(proto)

    async def run() -> None:
        proto.connection_made(transport)  # type: ignore[arg-type]
        for chunk in _split(stream, seed):
            if transport.closed:
                break
            proto.data_received(chunk)
            await asyncio.sleep(0)
        while proto.worker is not None:
            await asyncio.sleep(0.001)

    LOOP.run_until_complete(asyncio.wait_for(run(), 10))
    want, bad = _reference(stream, MAX_REQUEST)
    replies = Decoder(100_000).feed(bytes(transport.out))
    for r in replies:
        assert r.startswith(STATUSES), r
    if bad:
        assert transport.closed
    else:
        assert not transport.closed and len(replies) == len(want)
