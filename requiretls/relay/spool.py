"""A message the agent holds with bounded memory: its header section in memory, the rest, above a threshold,
in a spool file.

The LMTP DATA phase writes into a :class:`SpoolWriter`.  Until the message passes ``threshold`` bytes it stays in
memory; then everything after the header section goes to a file made in the spool directory (``mkstemp``: mode
0600) and unlinked at once, so only the open descriptor holds it: the data disappears when the transaction
ends, and with the process if the agent dies.  (:func:`clean_spool_dir` still removes any file a crash between
the two calls could have left, at start.)  The header section always stays in memory, since the agent rewrites
it (private fields out, a header field in); a message whose header section alone passes the threshold stays in
memory whole.

The outbound side reads the message in chunks (:meth:`Message.chunks`, ``os.pread``: any number of threads at
once) and sends DATA from them (:func:`send_data`), so a 50 MB message never is one Python object.  The
exception is the 8BITMIME downconversion, which needs the whole message (:meth:`Message.read`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import smtplib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger("requiretls")

#: Above this many bytes the body goes to a spool file.
SPOOL_THRESHOLD = 1 << 20
#: Prefix of spool file names (what :func:`clean_spool_dir` removes).
SPOOL_PREFIX = "lmtp-"
_CHUNK = 1 << 16
_BLANK_LINE = re.compile(rb"\n\r?\n")
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")


class SpoolFile:
    """An unlinked spool file: ``length`` bytes readable from ``fd`` until :meth:`close`."""

    def __init__(self, fd: int, length: int) -> None:
        self.fd, self.length = fd, length

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True, slots=True)
class Message:
    """``head`` (in memory: the header section with the blank line after it, or the whole message) followed by
    the spool file's bytes, if any."""

    head: bytes
    spool: SpoolFile | None = None

    @property
    def size(self) -> int:
        return len(self.head) + (self.spool.length if self.spool is not None else 0)

    @property
    def spooled(self) -> bool:
        return self.spool is not None

    def chunks(self, size: int = _CHUNK) -> Iterator[bytes]:
        for i in range(0, len(self.head), size):
            yield self.head[i : i + size]
        if self.spool is None:
            return
        pos = 0
        while pos < self.spool.length:
            data = os.pread(self.spool.fd, min(size, self.spool.length - pos), pos)
            if not data:
                raise OSError(f"spool file ended at {pos} of {self.spool.length} bytes")
            pos += len(data)
            yield data

    def read(self) -> bytes:
        """The whole message in memory (the 8BITMIME downconversion only)."""
        return b"".join(self.chunks())

    def has_8bit(self) -> bool:
        return any(_EIGHT_BIT.search(c) is not None for c in self.chunks())

    def with_head(self, change: Callable[[bytes], bytes]) -> Message:
        """The same message with ``change`` applied to the in-memory part (which holds the header section)."""
        return Message(change(self.head), self.spool)

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()


def as_message(message: bytes | Message) -> Message:
    return message if isinstance(message, Message) else Message(message)


class SpoolWriter:
    """Collects the DATA of one transaction: in memory up to ``threshold`` bytes, then the body in a spool file in
    ``directory`` (None: the system's temporary directory).  :meth:`finish` gives the :class:`Message`;
    :meth:`discard` drops everything (a failed transaction)."""

    def __init__(self, directory: str | None, threshold: int = SPOOL_THRESHOLD) -> None:
        self.directory, self.threshold = directory, threshold
        self._mem = bytearray()
        self._searched = 0
        self._buf = bytearray()
        self._fd = -1
        self._length = 0

    def write(self, data: bytes | bytearray) -> None:
        if self._fd >= 0:
            self._buf += data
            if len(self._buf) >= _CHUNK:
                self._flush()
            return
        self._mem += data
        if len(self._mem) > self.threshold:
            m = _BLANK_LINE.search(self._mem, max(0, self._searched - 2))
            self._searched = len(self._mem)
            if m is not None:
                self._open()
                self._buf += self._mem[m.end() :]
                del self._mem[m.end() :]
                self._flush()

    def _open(self) -> None:
        fd, path = tempfile.mkstemp(prefix=SPOOL_PREFIX, dir=self.directory)
        self._fd = fd
        try:
            os.unlink(path)
        except OSError:
            os.close(fd)
            self._fd = -1
            raise

    def _flush(self) -> None:
        view = memoryview(self._buf)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._length += n
        view.release()
        self._buf.clear()

    def finish(self) -> Message:
        if self._fd < 0:
            return Message(bytes(self._mem))
        self._flush()
        spool = SpoolFile(self._fd, self._length)
        self._fd = -1
        return Message(bytes(self._mem), spool)

    def discard(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        self._mem.clear()
        self._buf.clear()


def prepare_spool_dir(directory: str) -> int:
    """Create the spool directory (0700) when missing and remove spool files a crash left; the number removed.
    Raises OSError when the directory cannot be made or used."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    removed = 0
    for name in os.listdir(directory):
        if name.startswith(SPOOL_PREFIX):
            os.unlink(os.path.join(directory, name))
            removed += 1
    # A directory that cannot take a file is found now, not at the first large message.
    fd, path = tempfile.mkstemp(prefix=SPOOL_PREFIX, dir=directory)
    os.close(fd)
    os.unlink(path)
    return removed


def send_data(client: smtplib.SMTP, message: bytes | Message) -> tuple[int, bytes]:
    """smtplib's ``data()`` for a :class:`Message` read in chunks: DATA, the bytes with leading dots doubled
    (RFC 5321 section 4.5.2), CRLF if the message does not end with one, the final dot, the reply."""
    msg = as_message(message)
    code, repl = client.docmd("data")
    if code != 354:
        raise smtplib.SMTPDataError(code, repl)
    at_line_start = True
    tail = b""
    for chunk in msg.chunks():
        if not chunk:
            continue
        stuffed = chunk.replace(b"\n.", b"\n..")
        if at_line_start and chunk[:1] == b".":
            stuffed = b"." + stuffed
        client.send(stuffed)
        at_line_start = chunk[-1:] == b"\n"
        tail = (tail + chunk)[-2:]
    client.send(b".\r\n" if tail == b"\r\n" else b"\r\n.\r\n")
    done = float(getattr(client, "data_done_timeout", 0.0) or 0.0)
    sock = client.sock
    if not done or sock is None:
        return client.getreply()
    before = sock.gettimeout()
    sock.settimeout(done)  # the MX may scan the message before it answers (Postfix's smtp_data_done_timeout)
    try:
        return client.getreply()
    finally:
        sock.settimeout(before)
