"""A tiny SASL server speaking Dovecot's authentication protocol (what Postfix's ``smtpd_sasl_type = dovecot``
talks to), so that tests can submit as a SASL-authenticated user on every Postfix version (the Debian chroots
have no Cyrus SASL modules).  It accepts PLAIN for any user whose password is ``secret``."""

from __future__ import annotations

import base64
import contextlib
import os
import socketserver
import threading

PASSWORD = "secret"


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        w = self.wfile
        w.write(f"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nSPID\t{os.getpid()}\nCUID\t1\n"
                f"COOKIE\t{'0' * 32}\nDONE\n".encode())
        w.flush()
        pending: dict[str, bool] = {}
        for raw in self.rfile:
            parts = raw.decode(errors="replace").rstrip("\n").split("\t")
            cmd = parts[0]
            if cmd == "AUTH" and len(parts) >= 3:
                rid = parts[1]
                resp = next((p[5:] for p in parts[3:] if p.startswith("resp=")), None)
                if resp is None:
                    pending[rid] = True
                    w.write(f"CONT\t{rid}\t\n".encode())
                else:
                    w.write(self._verdict(rid, resp))
            elif cmd == "CONT" and len(parts) >= 3 and pending.pop(parts[1], False):
                w.write(self._verdict(parts[1], parts[2]))
            w.flush()

    @staticmethod
    def _verdict(rid: str, b64: str) -> bytes:
        try:
            _authz, user, password = base64.b64decode(b64).decode().split("\0")
        except (ValueError, UnicodeDecodeError):
            return f"FAIL\t{rid}\n".encode()
        if password == PASSWORD:
            return f"OK\t{rid}\tuser={user}\n".encode()
        return f"FAIL\t{rid}\tuser={user}\n".encode()


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class SaslServer:
    """``with SaslServer() as s: ... s.port``"""

    def __init__(self) -> None:
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> SaslServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.server.shutdown()
        self.server.server_close()
