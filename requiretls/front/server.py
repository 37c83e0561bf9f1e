"""The SMTP front: one asyncio task per client, each with its own connection to Postfix's smtpd on loopback.

The front speaks to smtpd in the same order the client speaks to it, one command at a time, and passes
smtpd's replies back unchanged except for the EHLO reply and the commands it answers itself (STARTTLS, BDAT,
a ``MAIL FROM ... REQUIRETLS`` that is not allowed).  smtpd accepts or refuses every message: the reply the
client gets after DATA is smtpd's.  If smtpd cannot be reached the client gets ``421`` and retries later; if
the front is down, nothing listens and the client retries later.  Nothing is ever accepted by the front alone.

TLS is the front's: it offers STARTTLS with Postfix's own certificate, and after the handshake passes the
dialogue on in clear over loopback.  smtpd therefore sees a session without TLS; the loopback service the
front uses is configured accordingly (``smtpd_tls_security_level = none``, ``smtpd_tls_auth_only = no``) and
the front enforces what those settings did: AUTH only after STARTTLS when the site asks for it (``auth_only``),
and the TLS parameters of the session go into the message in a ``Received:`` trace field, as smtpd would have
written them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from email.utils import formatdate

from requiretls.front import protocol as p
from requiretls.front.metrics import Counts
from requiretls.log import kv

log = logging.getLogger("requiretls")

#: A DATA line longer than this goes to smtpd in pieces, so that a line without end cannot fill memory.
DATA_CHUNK = 65536
#: smtpd's default ``smtpd_hard_error_limit``: the front closes after this many refused commands of its own.
ERROR_LIMIT = 20
#: Commands a pipelined group passes to smtpd in one write (RFC 2920 §3.1: these do not end a group; DATA
#: does, and goes last).
_GROUPED = frozenset({"MAIL", "RCPT", "RSET"})
#: The most commands in one group: smtpd's replies to a group wait in the socket until the front has written
#: all of it, so a group stays far below what the socket holds (the rest follows in the next group).
GROUP_LIMIT = 100


@dataclass(frozen=True, slots=True)
class FrontSettings:
    #: (IP, port), or (absolute path of a UNIX-domain socket, 0).
    backend: tuple[str, int]
    hostname: str
    tls: ssl.SSLContext | None
    auth_only: bool = False
    timeout: float = 300.0
    connect_timeout: float = 30.0
    max_connections: int = 2000
    #: The most a command line may take to arrive whole (a client that sends a byte a minute is cut off).
    line_deadline: float = 300.0

    @property
    def backend_text(self) -> str:
        host, port = self.backend
        return f"unix:{host}" if host.startswith("/") else f"{host}:{port}"


class Closed(Exception):
    """The client or smtpd went away, or took too long."""


class _Watch:
    """One deadline per session instead of a timer per read: whatever the session awaits (a line from the
    client, a reply from smtpd, a write that must drain) is cut off once :attr:`deadline` has passed.  Moving
    the deadline is an assignment; a single timer per session checks it and cancels the session's task when
    it has expired (``asyncio.wait_for`` around every read made a task and a timer per command)."""

    __slots__ = ("at", "deadline", "expired", "task", "timer")

    def __init__(self) -> None:
        self.deadline = float("inf")
        self.expired = False
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.at = float("inf")

    def arm(self, deadline: float) -> None:
        self.deadline = deadline
        if deadline < self.at:
            # Only a deadline earlier than the pending check needs a new timer; a later one is picked up when
            # the pending check fires.
            if self.timer is not None:
                self.timer.cancel()
            self.at = deadline
            self.timer = asyncio.get_running_loop().call_at(deadline, self._check)

    def _check(self) -> None:
        self.timer = None
        self.at = float("inf")
        if self.task is None or self.task.done():
            return
        now = self.task.get_loop().time()
        if now >= self.deadline:
            self.expired = True
            self.task.cancel()
        else:
            self.at = self.deadline
            self.timer = self.task.get_loop().call_at(self.deadline, self._check)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.task = None

    def absorb(self) -> bool:
        """In an ``except CancelledError``: whether the cancellation was the deadline's (then it is taken back
        from the task, which goes on to end the session); False for any other cancellation (re-raise it)."""
        if not self.expired:
            return False
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True


class _Lines:
    """Buffered line reading from a stream with a limit and a deadline per line."""

    __slots__ = ("buf", "eof", "reader", "timeout", "watch")

    def __init__(self, reader: _Plain | _TlsStream, timeout: float, watch: _Watch) -> None:
        self.reader = reader
        self.buf = bytearray()
        self.timeout = timeout
        self.eof = False
        self.watch = watch

    async def line(self, limit: int, deadline: float) -> tuple[bytes, bool]:
        """(line with its ending, complete).  A line longer than ``limit`` comes back as a piece of ``limit``
        bytes with complete=False (never split between CR and LF)."""
        start = 0
        buf = self.buf
        while True:
            i = buf.find(b"\n", start)
            if i >= 0:
                out = bytes(buf[: i + 1])
                del buf[: i + 1]
                return out, True
            if len(buf) >= limit:
                break
            start = len(buf)
            await self.fill(deadline)
        cut = limit - 1 if buf[limit - 1:limit] == b"\r" else limit
        out = bytes(buf[:cut])
        del buf[:cut]
        return out, False

    async def fill(self, deadline: float) -> None:
        """One more read into :attr:`buf`; Closed at the end of the stream, on an error, or past ``deadline``."""
        now = time.monotonic()
        if deadline <= now:
            raise Closed("timeout")
        self.watch.arm(min(deadline, now + self.timeout))
        try:
            got = await self.reader.read_into(self.buf)
        except (ConnectionError, OSError, ssl.SSLError) as e:
            raise Closed(type(e).__name__) from None
        if not got:
            self.eof = True
            raise Closed("eof")

    def pending(self) -> int:
        return len(self.buf)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


#: One receive buffer per worker for every TLS session (the loop runs one callback at a time, and what is
#: received is handed to OpenSSL at once).
_RECV = bytearray(65536)
#: Undecrypted bytes a TLS session holds before it stops reading from its client.
_INCOMING_LIMIT = 262144
#: The same for what OpenSSL decrypts (asking it for a new 64 KiB object per record costs an mmap each).
_PLAIN = bytearray(65536)
_PLAIN_VIEW = memoryview(_PLAIN)


class _Reader:
    """What :class:`_TlsStream` and :class:`_Plain` share: the loop's readiness callback receives into a
    buffer of the subclass (:meth:`_take`), pauses reading while more than :data:`_INCOMING_LIMIT` bytes wait
    there, and wakes the session waiting in :meth:`_wait_input`."""

    __slots__ = ("closed", "eof", "error", "fd", "loop", "registered", "sock", "waiter")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.eof = False
        self.error: OSError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.loop.add_reader(self.fd, self._on_readable)
        self.registered = True

    def _take(self, data: memoryview) -> int:
        """Keep ``data``; how many bytes now wait."""
        raise NotImplementedError

    def _at_eof(self) -> None:
        """The peer closed its side (or the socket failed: :attr:`error`)."""

    def _on_readable(self) -> None:
        try:
            n = self.sock.recv_into(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.error = e
            n = 0
        if n:
            if self._take(memoryview(_RECV)[:n]) > _INCOMING_LIMIT:
                self._pause()
        else:
            self.eof = True
            self._at_eof()
            self._pause()
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _pause(self) -> None:
        if self.registered:
            self.loop.remove_reader(self.fd)
            self.registered = False

    def _resume(self) -> None:
        if not self.registered:
            self.loop.add_reader(self.fd, self._on_readable)
            self.registered = True

    async def _wait_writable(self) -> None:
        """Until the socket takes more bytes (the kernel's send buffer was full)."""
        fut: asyncio.Future[None] = self.loop.create_future()
        self.loop.add_writer(self.fd, _wake, fut)
        try:
            await fut
        finally:
            self.loop.remove_writer(self.fd)

    def _send_now(self, data: bytes) -> bytes:
        """As much of ``data`` as the socket takes now; what is left (b"" when all went)."""
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return data
        return data[n:]

    async def drain(self, rest: bytes) -> None:
        """``rest`` (what :meth:`push` left), as the socket takes it."""
        while rest:
            await self._wait_writable()
            rest = self._send_now(rest)

    async def _wait_input(self) -> None:
        """Until the callback has received something (or the end); a socket error is raised."""
        self._resume()
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None
        if self.error is not None:
            raise self.error


class _TlsStream(_Reader):
    """The client's side after STARTTLS, without asyncio's TLS transport: the socket is read straight into
    OpenSSL's incoming buffer (one system call per read; OpenSSL driving the socket itself would read each
    record's header and body separately) and what OpenSSL writes goes straight to the socket.  asyncio's own
    TLS passes every record through several protocol layers in Python, which was a large part of the front's
    work per command.  Same OpenSSL, same context.

    As in asyncio's transports, the loop's readiness callback does the reading (so the loop never reports
    bytes that were already taken), and reading pauses while more than :data:`_INCOMING_LIMIT` bytes wait
    undecrypted for the session."""

    __slots__ = ("inc", "obj", "out")

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=True)
        super().__init__(sock)

    def _take(self, data: memoryview) -> int:
        self.inc.write(data)
        return self.inc.pending

    def _at_eof(self) -> None:
        self.inc.write_eof()

    async def _receive(self) -> bool:
        """Wait for more bytes for OpenSSL; False at the end of the stream."""
        if self.eof:
            if self.error is not None:
                raise self.error
            return False
        await self._wait_input()
        return True

    async def _flush(self) -> None:
        """Everything OpenSSL has written, to the socket."""
        data = self.out.read()
        if data:
            await self.drain(self._send_now(data))

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._receive():
                    raise ConnectionResetError("connection closed during the TLS handshake") from None
                continue
            # What completing the handshake wrote leaves at once (TLS 1.2: the server's Finished, which the
            # client waits for; TLS 1.3: the session ticket, which it does not).  Holding the ticket back for
            # the first reply left the client's Finished unanswered: the kernel delayed its ACK, and a client
            # with Nagle's algorithm (most) held its EHLO back for those 40 ms.
            await self._flush()
            return

    async def read_into(self, buf: bytearray) -> int:
        """Append what OpenSSL decrypts next to ``buf``: how many bytes, 0 at the end of the stream
        (close_notify, or the connection closed)."""
        while True:
            # Nothing undecrypted and nothing decrypted waiting: OpenSSL could only say so with an exception.
            if self.inc.pending or self.eof or self.obj.pending():
                try:
                    k: int = self.obj.read(len(_PLAIN), _PLAIN)  # type: ignore[assignment]
                    buf += _PLAIN_VIEW[:k]
                    return k
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return 0
            if self.out.pending:
                # OpenSSL has something to say while reading (a key update, say): before waiting.
                await self._flush()
            if not await self._receive():
                try:
                    data = self.obj.read(len(_PLAIN))
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ssl.SSLWantReadError):
                    return 0
                buf += data
                return len(data)

    def push(self, data: bytes, last: bool = False) -> bytes:
        """Encrypt ``data`` and send what the socket takes now; what is left for :meth:`drain`.  ``last``:
        close_notify follows ``data`` (in the same write), the session's end."""
        self.obj.write(data)
        if last:
            self.closed = True
            self._pause()
            with contextlib.suppress(OSError, ValueError):
                self.obj.unwrap()
        return self._send_now(self.out.read())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            # Before the descriptor goes: the loop must not watch a closed (and soon reused) number.
            self._pause()
            with contextlib.suppress(OSError, ValueError):
                # close_notify, sent if the socket takes it at once; the client's own is not waited for.
                self.obj.unwrap()
            with contextlib.suppress(OSError, ValueError):
                if self.out.pending:
                    self.sock.send(self.out.read())
        with contextlib.suppress(OSError):
            self.sock.close()


class _Plain(_Reader):
    """A connection in clear (the client's until STARTTLS, smtpd's on loopback): bytes are received by the
    loop's readiness callback into a buffer and sent straight from the session (asyncio's stream classes add
    a protocol, a transport and a reader object between the two, for nothing the front needs).  Reading
    pauses while more than :data:`_INCOMING_LIMIT` bytes wait for the session, and for good with
    :meth:`hand_over` (STARTTLS gives the socket to :class:`_TlsStream`)."""

    __slots__ = ("buf", "handed_over")

    def __init__(self, sock: socket.socket) -> None:
        self.buf = bytearray()
        self.handed_over = False
        super().__init__(sock)

    def _take(self, data: memoryview) -> int:
        self.buf += data
        return len(self.buf)

    @classmethod
    async def connect(cls, host: str, port: int) -> _Plain:
        loop = asyncio.get_running_loop()
        if host.startswith("/"):
            # A UNIX-domain socket (a master.cf unix service): half the system time of loopback TCP per
            # command, and no other local user can hand smtpd a PROXY header.  Its connect either succeeds at
            # once or fails with EAGAIN when the listen queue is full (smtpd busy: master.cf's process limit
            # reached); never "in progress" as TCP's, so asyncio's sock_connect would report the EAGAIN case
            # as connected.  Try again until the session's connect deadline cuts it off (then 421).
            while True:
                usock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    usock.setblocking(False)
                    usock.connect(host)
                    return cls(usock)
                except (BlockingIOError, InterruptedError):
                    usock.close()
                    await asyncio.sleep(0.05)
                except BaseException:
                    usock.close()
                    raise
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        err: OSError = OSError(f"no address for {host}")
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_connect(sock, addr)
            except OSError as e:
                sock.close()
                err = e
                continue
            except BaseException:
                sock.close()
                raise
            return cls(sock)
        raise err

    async def read_into(self, buf: bytearray) -> int:
        """Append what was received to ``buf``: how many bytes, 0 at the end of the stream."""
        while not self.buf:
            if self.eof or self.handed_over:
                if self.error is not None:
                    raise self.error
                return 0
            await self._wait_input()
        n = len(self.buf)
        buf += self.buf
        self.buf.clear()
        if not self.eof and not self.handed_over:
            self._resume()
        return n

    def push(self, data: bytes) -> bytes:
        """Send what the socket takes now; what is left for :meth:`drain`."""
        return self._send_now(data)

    def hand_over(self) -> int:
        """Stop reading for good; the bytes read and not yet taken (which a client that waited for our reply
        cannot have sent)."""
        self.handed_over = True
        self._pause()
        return len(self.buf)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._pause()
        self.sock.close()


class Session:
    def __init__(self, front: Front, sock: socket.socket) -> None:
        self.front = front
        self.cfg = front.settings
        self.watch = _Watch()
        self.plain = _Plain(sock)
        self.client = _Lines(self.plain, self.cfg.timeout, self.watch)
        try:
            self.peer = sock.getpeername()
            self.local = sock.getsockname()
        except OSError:
            self.peer, self.local = ("?", 0), ("?", 0)
        self.tls_active = False
        self.tls_info = ""
        self.helo = ""
        self.requiretls = False
        #: smtpd offered PIPELINING in its last EHLO reply (and no STARTTLS came since).
        self.pipelining = False
        #: smtpd accepted a MAIL and the transaction has not ended (DATA's end, RSET, EHLO/HELO).
        self.in_mail = False
        self.errors = 0
        self.bw: _Plain | None = None
        self.backend: _Lines | None = None
        self.tls: _TlsStream | None = None

    # --- the two ends ------------------------------------------------------------------------------------

    async def send(self, data: bytes, last: bool = False) -> None:
        """To the client; ``last``: with TLS, close_notify in the same write (the session's end)."""
        # Sent at once unless the socket is full: only then is there anything to wait for (and a deadline).
        try:
            rest = self.tls.push(data, last) if self.tls is not None else self.plain.push(data)
            if rest:
                self.watch.arm(time.monotonic() + self.cfg.timeout)
                await (self.tls or self.plain).drain(rest)
        except OSError as e:
            raise Closed(f"client write: {type(e).__name__}") from None

    async def to_backend(self, data: bytes) -> None:
        assert self.bw is not None
        try:
            rest = self.bw.push(data)
            if rest:
                self.watch.arm(time.monotonic() + self.cfg.timeout)
                await self.bw.drain(rest)
        except OSError as e:
            raise Closed(f"smtpd write: {type(e).__name__}") from None

    async def reply(self) -> bytes:
        """One whole reply from smtpd (all its lines)."""
        assert self.backend is not None
        out = b""
        deadline = time.monotonic() + self.cfg.timeout
        for _ in range(p.EHLO_LINES_LIMIT * 4):
            raw, complete = await self.backend.line(p.LINE_LIMIT * 4, deadline)
            if not out and complete and raw[3:4] != b"-" and raw[-2:] == b"\r\n":
                return raw  # one line, as smtpd sends it (most replies)
            content, _ = p.split_line(raw)
            out += content + b"\r\n"
            if complete and (len(content) < 4 or content[3:4] != b"-"):
                return out
        raise Closed("smtpd reply too long")

    # --- the dialogue ------------------------------------------------------------------------------------

    async def run(self) -> None:
        self.watch.task = asyncio.current_task()
        try:
            await self._run()
        except Closed as e:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s", kv(front="closed", client=self.peer[0], why=str(e)))
        except asyncio.CancelledError:
            if not self.watch.absorb():
                raise
            # The session's deadline passed (see _Watch): the same end as a read that timed out.
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s", kv(front="closed", client=self.peer[0], why="timeout"))
        finally:
            self.watch.stop()
            # Closing is asynchronous: the transports finish on their own, nobody needs to wait for them.
            if self.bw is not None:
                self.bw.close()
            if self.tls is not None:
                self.tls.close()
            self.plain.close()

    async def _run(self) -> None:
        self.watch.arm(time.monotonic() + self.cfg.connect_timeout)
        err: Exception | None = None
        try:
            bw = await _Plain.connect(*self.cfg.backend)
        except asyncio.CancelledError:
            if not self.watch.absorb():
                raise
            self.watch.expired = False
            err = TimeoutError("connecting to smtpd timed out")
        except OSError as e:
            err = e
        if err is not None:
            self.front.counters.backend_down += 1
            log.warning("%s", kv(front="smtpd unreachable", client=self.peer[0], backend=self.cfg.backend_text,
                                error=f"{type(err).__name__}: {err}"))
            await self.send(b"421 4.3.2 Service currently unavailable\r\n")
            return
        self.bw = bw
        self.backend = _Lines(bw, self.cfg.timeout, self.watch)
        await self.to_backend(p.proxy_v2((self.peer[0], self.peer[1]), (self.local[0], self.local[1])))
        await self.send(await self.reply())
        await self.commands()

    async def refuse(self, text: bytes) -> None:
        self.errors += 1
        await self.send(text)
        if self.errors >= ERROR_LIMIT:
            await self.send(b"421 4.7.0 Error: too many errors\r\n")
            raise Closed("too many errors")

    async def commands(self) -> None:
        while True:
            deadline = time.monotonic() + self.cfg.line_deadline
            raw, complete = await self.client.line(p.LINE_LIMIT + 2, deadline)
            if not complete:
                while not complete:  # skip the rest of the over-long line
                    raw, complete = await self.client.line(p.LINE_LIMIT + 2, deadline)
                await self.refuse(b"500 5.5.2 Error: command line too long\r\n")
                continue
            content, _ = p.split_line(raw)
            err = p.command_error(content)
            if err is not None:
                await self.refuse(err)
                continue
            cmd = p.parse_command(content)
            verb = cmd.verb
            if verb == "STARTTLS":
                await self.starttls(cmd)
            elif verb in ("EHLO", "HELO"):
                await self.to_backend(content + b"\r\n")
                rep = await self.reply()
                if verb == "EHLO":
                    rep = p.rewrite_ehlo(rep, tls_active=self.tls_active, tls_offered=self.cfg.tls is not None,
                                         auth_only=self.cfg.auth_only)
                ok = p.reply_code(rep) // 100 == 2
                if ok:
                    # smtpd starts over after an accepted EHLO/HELO (a refused one leaves its transaction,
                    # and the REQUIRETLS of that transaction, as they were).
                    self.helo = cmd.arg.split(" ", 1)[0][:255]
                    self._end_transaction()
                self.pipelining = ok and verb == "EHLO" and any(
                    ln[4:].upper().split(b" ", 1)[0] == b"PIPELINING" for ln in p.reply_lines(rep)[1:])
                await self.send(rep)
            elif verb in ("BDAT",):
                await self.refuse(b"502 5.5.1 Error: command not implemented\r\n")
            elif verb == "AUTH":
                await self.auth(content)
            elif verb in _GROUPED and self.pipelining and self.client.pending() and await self.group(cmd):
                continue
            elif verb == "MAIL":
                await self.mail(cmd)
            elif verb == "DATA":
                await self.data(content)
            elif verb == "RSET":
                self._end_transaction()
                await self.pass_through(content)
            elif verb == "QUIT":
                await self.to_backend(content + b"\r\n")
                rep = await self.reply()
                # With TLS, the reply and close_notify in one segment.
                with contextlib.suppress(Closed):
                    await self.send(rep, last=True)
                raise Closed("quit")
            else:
                await self.pass_through(content)

    async def pass_through(self, content: bytes) -> bytes:
        await self.to_backend(content + b"\r\n")
        rep = await self.reply()
        await self.send(rep)
        if rep.startswith(b"421"):
            raise Closed("smtpd closed the session")
        return rep

    async def starttls(self, cmd: p.Command) -> None:
        ctx = self.cfg.tls
        if ctx is None:
            await self.refuse(b"502 5.5.1 Error: command not implemented\r\n")
            return
        if self.tls_active:
            await self.refuse(b"554 5.5.1 Error: TLS already active\r\n")
            return
        if cmd.arg:
            await self.refuse(b"501 5.5.4 Syntax: STARTTLS\r\n")
            return
        if self.client.pending() + self.plain.hand_over():
            # Commands sent behind STARTTLS in clear would be read as if they came over TLS (the STARTTLS
            # command-injection attack): drop the session, as Postfix does.
            self.front.counters.injection += 1
            log.warning("%s", kv(front="plaintext after STARTTLS", client=self.peer[0], action="disconnect"))
            await self.send(b"554 5.5.1 Error: command pipelining after STARTTLS\r\n")
            raise Closed("injection")
        await self.send(b"220 2.0.0 Ready to start TLS\r\n")
        self.watch.arm(time.monotonic() + self.cfg.timeout)
        try:
            await self._start_tls(ctx)
        except asyncio.CancelledError:
            if self.watch.expired:
                log.info("%s", kv(front="TLS handshake failed", client=self.peer[0], error="TimeoutError"))
            raise
        except (ssl.SSLError, OSError, ConnectionError) as e:
            log.info("%s", kv(front="TLS handshake failed", client=self.peer[0], error=f"{type(e).__name__}: {e}"))
            raise Closed("tls") from None
        self.tls_active = True
        self.front.counters.tls += 1
        obj = self.tls.obj if self.tls is not None else None
        if obj is not None:
            cipher = obj.cipher() or ("?", "?", 0)
            self.tls_info = f"using {obj.version()} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)"
            log.info("%s", kv(front="TLS established", client=self.peer[0], protocol=obj.version(), cipher=cipher[0]))
        # RFC 3207 §4.2: the session starts over, and nothing said in clear counts.  smtpd is not told of the
        # STARTTLS (its side stays in clear): a transaction begun in clear is ended there with an RSET whose
        # reply the client never sees; the client's next EHLO resets smtpd's greeting state as usual.
        begun = self.in_mail
        self._end_transaction()
        self.pipelining = False
        self.helo = ""
        if begun:
            await self.to_backend(b"RSET\r\n")
            if not (await self.reply()).startswith(b"250"):
                raise Closed("smtpd refused the RSET after STARTTLS")

    async def _start_tls(self, ctx: ssl.SSLContext) -> None:
        """From here on OpenSSL has the client's socket (no longer read in clear; the 220 is written)."""
        tls = _TlsStream(self.plain.sock, ctx)
        self.tls = tls
        self.client.reader = tls
        await tls.handshake()

    async def auth(self, content: bytes) -> None:
        if self.cfg.auth_only and not self.tls_active:
            await self.refuse(b"538 5.7.11 Encryption required for requested authentication mechanism\r\n")
            return
        await self.to_backend(content + b"\r\n")
        for _ in range(16):
            rep = await self.reply()
            await self.send(rep)
            if not rep.startswith(b"334"):
                return
            raw, complete = await self.client.line(12288 + 2, time.monotonic() + self.cfg.line_deadline)
            if not complete:
                await self.to_backend(b"*\r\n")
                await self.send(await self.reply())
                return
            line, _ = p.split_line(raw)
            await self.to_backend(line + b"\r\n")
        raise Closed("AUTH dialogue too long")

    async def mail(self, cmd: p.Command) -> None:
        m = p.mail_from(cmd, tls_active=self.tls_active)
        if m.error is not None:
            if m.error.startswith(b"555"):
                self.front.counters.requiretls_refused += 1
                log.info("%s", kv(front="REQUIRETLS refused", client=self.peer[0], reason="no TLS session"))
            await self.refuse(m.error)
            return
        await self.to_backend(m.line + b"\r\n")
        rep = await self.reply()
        self._mail_replied(m, rep)
        await self.send(rep)

    def _mail_replied(self, m: p.MailFrom, rep: bytes) -> None:
        """smtpd's reply to a MAIL: accepted, the transaction begins, with the REQUIRETLS the client gave."""
        if p.reply_code(rep) // 100 == 2:
            self.requiretls = m.requiretls
            self.in_mail = True

    def _end_transaction(self) -> None:
        """smtpd ended the transaction (RSET, end of data, an accepted EHLO/HELO), or the front did (STARTTLS)."""
        self.requiretls = False
        self.in_mail = False

    async def group(self, first: p.Command) -> bool:
        """RFC 2920: ``first`` and the commands the client pipelined behind it (MAIL, RCPT, RSET, and a DATA
        that ends the group) go to smtpd in one write, and smtpd's replies to the client in one write, in
        order; False (nothing done) when ``first`` is not one to pass on as it is.  Only whole lines the client
        has already sent are taken; a command the front answers itself, or any other, ends the group before
        it and is read as usual."""
        cmds: list[tuple[p.Command, p.MailFrom | None]] = []
        for cmd in self._pipelined(first):
            m = None
            if cmd.verb == "MAIL":
                m = p.mail_from(cmd, tls_active=self.tls_active)
                if m.error is not None:
                    break
            cmds.append((cmd, m))
        if len(cmds) < 2:
            return False
        # What _pipelined() looked at and the group takes leaves the client's buffer.
        del self.client.buf[:sum(len(c.raw) + 2 for c, _ in cmds[1:])]
        await self.to_backend(b"".join((m.line if m is not None else c.raw) + b"\r\n" for c, m in cmds))
        out = b""
        rep = b""
        for cmd, m in cmds:
            rep = await self.reply()
            out += rep
            if m is not None:
                self._mail_replied(m, rep)
            elif cmd.verb == "RSET":
                self._end_transaction()
            if rep.startswith(b"421"):
                await self.send(out)
                raise Closed("smtpd closed the session")
        await self.send(out)
        if cmds[-1][0].verb == "DATA" and rep.startswith(b"354"):
            await self.message()
        return True

    def _pipelined(self, first: p.Command) -> list[p.Command]:
        """``first`` and the whole command lines behind it in the client's buffer that may join its group, up
        to and including a DATA (each ends with CRLF: any other line ends the group before it)."""
        out = [first]
        buf = self.client.buf
        pos = 0
        while out[-1].verb != "DATA" and len(out) < GROUP_LIMIT:
            i = buf.find(b"\n", pos)
            if i < 0:
                break
            content, ending = p.split_line(bytes(buf[pos:i + 1]))
            if ending != b"\r\n" or p.command_error(content) is not None:
                break
            cmd = p.parse_command(content)
            if cmd.verb not in _GROUPED and cmd.verb != "DATA":
                break
            out.append(cmd)
            pos = i + 1
        return out

    async def data(self, content: bytes) -> None:
        await self.to_backend(content + b"\r\n")
        rep = await self.reply()
        await self.send(rep)
        if rep.startswith(b"354"):
            await self.message()

    async def message(self) -> None:
        """After smtpd's 354: the message, from the client to smtpd, and smtpd's reply back."""
        top = b""
        if self.tls_info:
            top += p.header_block([(b"Received", self._trace().encode("utf-8", "surrogateescape"))])
        if self.requiretls:
            top += p.header_block([(p.CARRIER, b"yes")])
        stream = p.DataStream()
        deadline = time.monotonic() + self.cfg.timeout
        # The front's own fields leave with the first lines of the message, in one write.
        pending = bytearray(top)
        buf = self.client.buf
        while True:
            out = stream.take(buf, DATA_CHUNK)
            if out:
                pending += out
                deadline = time.monotonic() + self.cfg.timeout
            if stream.done or len(pending) >= DATA_CHUNK:
                await self.to_backend(bytes(pending))
                pending.clear()
            if stream.done:
                break
            await self.client.fill(deadline)
        self.front.counters.carrier_removed += stream.dropped
        if stream.dropped:
            log.info("%s", kv(front="forged Require-TLS-ESMTP removed", client=self.peer[0], fields=stream.dropped))
        rep = await self.reply()
        await self.send(rep)
        if p.reply_code(rep) // 100 == 2:
            if self.requiretls:
                self.front.counters.requiretls += 1
            else:
                self.front.counters.plain += 1
            log.info("%s", kv(front="message", client=self.peer[0], requiretls="yes" if self.requiretls else "no",
                              tls=self.tls_info or "none", reply=rep.split(b"\r\n", 1)[0].decode("ascii", "replace")))
        # Accepted or refused, the transaction is over (smtpd resets after the end of data either way).
        self._end_transaction()

    def _trace(self) -> str:
        who = f"{self.helo} " if self.helo else ""
        return (f"from {who}([{self.peer[0]}]) by {self.cfg.hostname} (requiretls front) with ESMTPS "
                f"({self.tls_info}); {_now_rfc5322()}")


_date: tuple[int, str] = (0, "")


def _now_rfc5322() -> str:
    """The date of a trace field, made once a second (formatting it for every message cost more than the rest
    of the field)."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, localtime=True))
    return _date[1]


class Front:
    def __init__(self, settings: FrontSettings) -> None:
        self.settings = settings
        self.counters = Counts()
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, sock: socket.socket) -> None:
        c = self.counters
        c.connections += 1
        if c.active >= self.settings.max_connections:
            c.refused_busy += 1
            with contextlib.suppress(OSError):
                sock.send(b"421 4.3.2 Too many connections, try again later\r\n")
            sock.close()
            return
        c.active += 1
        try:
            await Session(self, sock).run()
        finally:
            c.active -= 1

    def _spawn(self, sock: socket.socket) -> None:
        task = asyncio.get_running_loop().create_task(self.handle(sock))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def start(self, host: str | None, port: int) -> Listener:
        socks = []
        for family, type_, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE):
            sock = socket.socket(family, type_, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(1024)
            socks.append(sock)
        return Listener(self, socks)

    async def start_on(self, sock: socket.socket) -> Listener:
        return Listener(self, [sock])


class Listener:
    """Accepts on listening sockets and gives each connection its session (a task).  Like asyncio's server:
    when the process is out of descriptors, accepting pauses for a second instead of spinning."""

    def __init__(self, front: Front, socks: list[socket.socket]) -> None:
        self.front = front
        self.sockets = socks
        self.loop = asyncio.get_running_loop()
        for sock in socks:
            sock.setblocking(False)
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("%s", kv(front="cannot accept", error=str(e), action="pausing 1 s"))
                    self.loop.remove_reader(sock.fileno())
                    self.loop.call_later(1.0, self._resume, sock)
                    return
                raise
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.front._spawn(conn)

    def _resume(self, sock: socket.socket) -> None:
        if sock.fileno() >= 0:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self.loop.remove_reader(sock.fileno())
                sock.close()
