"""Netstring framing of socketmap_table(5)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from requiretls.policyd.netstring import Decoder, NetstringError, TooLong, encode


def test_encode() -> None:
    assert encode(b"default example.com") == b"19:default example.com,"
    assert encode(b"") == b"0:,"


@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(1, 50))
def test_any_split_of_a_stream_decodes_the_same(payloads: list[bytes], chunk: int) -> None:
    stream = b"".join(encode(p) for p in payloads)
    d = Decoder(300)
    out: list[bytes] = []
    for i in range(0, len(stream), chunk):
        out += d.feed(stream[i : i + chunk])
    assert out == payloads and d.pending == 0


@pytest.mark.parametrize("bad", [b"abc:", b"3:abcd", b":x,", b"01:a,", b"-1:,", b"1x:a,"])
def test_malformed_streams_raise(bad: bytes) -> None:
    with pytest.raises(NetstringError):
        Decoder(100).feed(bad)


def test_oversized_length_is_refused_before_the_payload_arrives() -> None:
    with pytest.raises(TooLong):
        Decoder(100).feed(b"101:")
    with pytest.raises(TooLong):
        Decoder(100).feed(b"99999")


@given(st.binary(max_size=200))
def test_garbage_never_raises_anything_but_netstring_error(data: bytes) -> None:
    d = Decoder(64)
    with contextlib.suppress(NetstringError):
        d.feed(data)
