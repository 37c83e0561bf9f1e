"""Reference point for bench/policyd_vs_peer.py: the least a Python socketmap server can do per query.

A uvloop protocol that splits netstrings and answers from a dict of ready-made replies for ``default dN.bench``:
no validation, no metrics, no expiry.  It shows the ceiling of Python plus the kernel on the machine at the time
of the run, so that the other rows can be read against it.

    python bench/minimal_sockmap.py PORT DOMAINS
"""

from __future__ import annotations

import asyncio
import sys

from benchzone import expected_answer

try:
    import uvloop
except ImportError:  # the ceiling of plain asyncio, then
    uvloop = None  # type: ignore[assignment]


def main() -> None:
    port, domains = int(sys.argv[1]), int(sys.argv[2])
    answers = {f"default d{n}.bench".encode(): expected_answer(n).encode() for n in range(1, domains + 1)}
    wire = {k: b"%d:%b," % (len(v), v) for k, v in answers.items()}
    notfound = b"9:NOTFOUND ,"

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data if self.buf else data
            out = []
            while True:
                colon = buf.find(b":", 0, 6)
                if colon < 0:
                    break
                end = colon + 1 + int(buf[:colon])
                if len(buf) <= end:
                    break
                out.append(wire.get(buf[colon + 1 : end], notfound))
                buf = buf[end + 1 :]
            self.buf = buf
            if out:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", port, backlog=512)
        async with server:
            await server.serve_forever()

    if uvloop is not None:
        uvloop.install()
    asyncio.run(serve())


if __name__ == "__main__":
    main()
