"""Netstrings (D. J. Bernstein), the framing of Postfix's socketmap protocol (socketmap_table(5)).

``<length>:<payload>,`` with a decimal length without leading zeros.  The decoder is incremental and refuses a
length above its limit before reading the payload, so a hostile client cannot make it buffer much.
"""

from __future__ import annotations


class NetstringError(ValueError):
    """The byte stream is not a netstring; the connection cannot be resynchronised and should be closed."""


class TooLong(NetstringError):
    """A well-formed length prefix announced more than the limit."""


def encode(payload: bytes) -> bytes:
    return b"%d:%b," % (len(payload), payload)


class Decoder:
    """Feed bytes, get complete payloads."""

    __slots__ = ("_buf", "_max", "_max_digits")

    def __init__(self, max_length: int = 2048) -> None:
        self._buf = bytearray()
        self._max = max_length
        self._max_digits = len(str(max_length))

    def feed(self, data: bytes) -> list[bytes]:
        if not self._buf and len(data) > 2:
            # Fast path for a read that holds exactly one whole netstring, which is what a client with one
            # request in flight (Postfix) sends: no copy into the buffer.  Anything else takes the general path.
            colon = data.find(b":", 0, self._max_digits + 1)
            end = len(data) - 1
            if colon > 0 and data[end] == 0x2C:
                digits = data[:colon]
                if (digits.isdigit() and (colon == 1 or data[0] != 0x30) and end - colon - 1 <= self._max
                        and int(digits) == end - colon - 1):
                    return [data[colon + 1 : end]]
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        while pos < n:
            colon = buf.find(b":", pos, pos + self._max_digits + 1)
            if colon < 0:
                head = bytes(buf[pos : pos + self._max_digits + 1])
                if head.isdigit():
                    if len(head) > self._max_digits:
                        raise TooLong(f"netstring length of more than {self._max_digits} digits")
                    break  # the length is still arriving
                raise NetstringError(f"bad netstring length {head[:12]!r}")
            digits = bytes(buf[pos:colon])
            if not digits.isdigit() or (len(digits) > 1 and digits[0:1] == b"0"):
                raise NetstringError(f"bad netstring length {digits[:12]!r}")
            length = int(digits)
            if length > self._max:
                raise TooLong(f"request of {length} bytes exceeds the limit of {self._max}")
            end = colon + 1 + length
            if end >= n:
                break
            if buf[end] != 0x2C:  # ","
                raise NetstringError("netstring not terminated by ','")
            out.append(bytes(buf[colon + 1 : end]))
            pos = end + 1
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
