"""Where mail goes and where daemons listen, parsed once into frozen values with Postfix's semantics.

Pure (no I/O, no DNS): :mod:`requiretls.config` parses the admin's text once, and :mod:`requiretls.policy`,
:mod:`requiretls.dest` and the daemons read the typed value, never the string again.

* :class:`NextHop`: a Postfix SMTP destination (smtp(8) "SMTP DESTINATION SYNTAX", postconf(5) relayhost):
  ``domain`` / ``domain:port`` are looked up as MX records, ``[host]`` / ``[host]:port`` as the host's own
  addresses (the brackets suppress the MX lookup), ``[192.0.2.1]`` / ``[ipv6:2001:db8::1]`` are address
  literals.  The port defaults to 25 (the ``smtp`` service).
* :class:`Endpoint`: an ``IP`` / ``IP:PORT`` / ``[IPv6]:PORT`` address to connect to or serve on.
* :class:`ListenAddress`: where a daemon listens, one syntax for all of them: ``unix:/absolute/path`` or
  ``inet:HOST:PORT`` (``inet:[::1]:PORT``); libmilter's ``inet:PORT@HOST`` and ``local:/path`` are still read.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Literal

SMTP_PORT = 25
#: Service names Postfix resolves through /etc/services for a next hop; fixed here so that parsing stays pure.
SERVICES = {"smtp": 25, "submission": 587, "submissions": 465, "smtps": 465}

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")


def parse_port(text: str, what: str = "port") -> int:
    """A TCP port 1-65535 in decimal."""
    if not _PORT.fullmatch(text) or not 0 < int(text) < 65536:
        raise ValueError(f"{what} must be a number from 1 to 65535, not {text!r}")
    return int(text)


def _hostname(text: str) -> str:
    """A DNS host name in normal form (lower case, A-labels, no trailing dot), or ValueError."""
    name = text.rstrip(".").lower()
    if not name.isascii():
        with contextlib.suppress(UnicodeError):
            name = name.encode("idna").decode("ascii")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{text!r} is not a host name")
    if labels[-1].isdigit():
        raise ValueError(f"{text!r} looks like an IP address: write it in brackets, [{text}]")
    return name


def _ip(text: str) -> str:
    return str(ipaddress.ip_address(text))


@dataclass(frozen=True, slots=True)
class NextHop:
    """A Postfix SMTP next hop.  ``mx`` is False when the name was written in brackets: then the host's own
    A/AAAA records are used, never its MX records (smtp(8); ``relayhost = [smtp.example.com]``).

    Equality is Postfix's: ``[example.com]`` and ``[example.com]:25`` are the same hop; ``example.com`` is a
    different one (its MX hosts).
    """

    host: str
    port: int = SMTP_PORT
    mx: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.mx and self.literal:
            raise ValueError(f"an address literal has no MX records: [{self.host}]")

    @classmethod
    def parse(cls, text: str) -> NextHop:
        """``domain``, ``domain:port``, ``[host]``, ``[host]:port``, ``[192.0.2.1]``, ``[ipv6:2001:db8::1]:587``
        (a bare IPv6 address in brackets is read too, as Postfix does).  A port is a number or one of
        :data:`SERVICES`; ``[host]:`` means the default port, as in Postfix.  ValueError names the problem."""
        t = text.strip()
        if not t:
            raise ValueError("empty next hop")
        if t.startswith("["):
            inside, sep, rest = t[1:].partition("]")
            if not sep:
                raise ValueError(f"missing ']' in {text!r}")
            if rest and not rest.startswith(":"):
                raise ValueError(f"garbage after ']' in {text!r}")
            port = cls._port(rest[1:], text)
            if inside.lower().startswith("ipv6:"):
                try:
                    address = ipaddress.IPv6Address(inside[5:])
                except ValueError:
                    raise ValueError(f"malformed IPv6 address in {text!r}") from None
                return cls(str(address), port, mx=False)
            try:
                return cls(_ip(inside), port, mx=False)
            except ValueError:
                return cls(_hostname(inside), port, mx=False)
        host, sep, port_text = t.rpartition(":")
        if not sep:
            host, port_text = t, ""
        if ":" in host:
            raise ValueError(f"an IPv6 address must be written [ipv6:ADDRESS], not {text!r}")
        with contextlib.suppress(ValueError):
            _ip(host)
            raise ValueError(f"an address must be written in brackets, [{host}], not {text!r}")
        return cls(_hostname(host), cls._port(port_text, text), mx=True)

    @staticmethod
    def _port(text: str, whole: str) -> int:
        if not text:
            return SMTP_PORT
        if text.lower() in SERVICES:
            return SERVICES[text.lower()]
        return parse_port(text, f"port in {whole!r}")

    @property
    def literal(self) -> bool:
        """True for an address literal (``[192.0.2.1]``): no DNS name, hence no DANE and no MTA-STS."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        """The form Postfix writes (``[host]:587``, ``[ipv6:2001:db8::1]``, ``example.com``); the port only
        when it is not 25."""
        host = f"ipv6:{self.host}" if ":" in self.host else self.host
        text = host if self.mx else f"[{host}]"
        return text if self.port == SMTP_PORT else f"{text}:{self.port}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An IP address and a port: ``192.0.2.1``, ``192.0.2.1:53``, ``[2001:db8::1]:53`` (``::1`` alone too)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> Endpoint:
        """ValueError unless the host is an IP address; without a port, ``default_port`` (None: required)."""
        t = text.strip()
        m = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", t)
        if m:
            host, port_text = m.group(1), m.group(2)
        elif t.count(":") == 1:
            host, port_text = t.split(":")
        else:
            host, port_text = t, None
        try:
            address = _ip(host)
        except ValueError:
            raise ValueError(f"{text!r} is not IP or IP:PORT ([IPv6]:PORT)") from None
        if port_text is None:
            if default_port is None:
                raise ValueError(f"{text!r} has no port: write IP:PORT ([IPv6]:PORT)")
            return cls(address, default_port)
        return cls(address, parse_port(port_text, f"port in {text!r}"))

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Backend:
    """Where the SMTP front reaches Postfix: a loopback ``IP:PORT``, or a UNIX-domain socket ``unix:PATH``.  A
    relative PATH is under Postfix's ``queue_directory``, where master(8) makes the socket of a master.cf
    ``unix`` service (``public/NAME``, ``private/NAME``)."""

    endpoint: Endpoint | None = None
    path: str = ""

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> Backend:
        t = text.strip()
        if not t:
            raise ValueError("empty: write unix:public/NAME (under Postfix's queue_directory) or a loopback IP:PORT")
        if t.startswith("unix:"):
            path = t[5:]
            if not path or path.endswith("/") or any(c.isspace() for c in path) or ".." in path.split("/"):
                raise ValueError(f"{text!r}: write unix:public/NAME (under Postfix's queue_directory) or "
                                 "unix:/absolute/path")
            return cls(path=path)
        return cls(endpoint=Endpoint.parse(t, default_port))

    def socket_path(self, queue_directory: str) -> str:
        """The socket's absolute path (a relative one under ``queue_directory``)."""
        return self.path if self.path.startswith("/") else os.path.join(queue_directory, self.path)

    def master_service(self, queue_directory: str) -> tuple[str, bool] | None:
        """(NAME, private) of the master.cf ``unix`` service whose socket this is: ``public/NAME`` or
        ``private/NAME`` under ``queue_directory``; None for any other path."""
        path = self.path
        prefix = queue_directory.rstrip("/") + "/"
        if path.startswith(prefix):
            path = path[len(prefix):]
        m = re.fullmatch(r"(public|private)/([A-Za-z0-9][A-Za-z0-9._-]*)", path)
        return (m.group(2), m.group(1) == "private") if m else None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.endpoint is None else str(self.endpoint)


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where a daemon listens: a unix socket ``path`` or an ``inet`` endpoint.  ``legacy`` says the text was
    in an old form (``inet:PORT@HOST``, ``local:/path``); it does not take part in equality."""

    kind: Literal["unix", "inet"]
    path: str = ""
    endpoint: Endpoint | None = None
    legacy: bool = field(default=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """``unix:/absolute/path`` or ``inet:HOST:PORT`` (``inet:[::1]:PORT``); also the old forms
        ``local:/path``, ``inet:PORT@HOST``, ``inet6:PORT@HOST`` and ``inet:PORT`` (loopback), with
        ``legacy`` set.  ValueError names the problem."""
        t = text.strip()
        kind, sep, rest = t.partition(":")
        if not sep:
            raise ValueError(f"{text!r}: use unix:/absolute/path or inet:HOST:PORT")
        if kind in ("unix", "local"):
            if not rest.startswith("/") or any(c.isspace() for c in rest) or rest.endswith("/"):
                raise ValueError(f"{text!r}: a unix socket needs an absolute path, unix:/path/name.sock")
            return cls("unix", path=rest, legacy=kind == "local")
        if kind not in ("inet", "inet6"):
            raise ValueError(f"{text!r}: use unix:/absolute/path or inet:HOST:PORT")
        if "@" in rest or _PORT.fullmatch(rest):
            port_text, _, host = rest.partition("@")
            host = host.strip("[]") or ("::1" if kind == "inet6" else "127.0.0.1")
            try:
                ep = Endpoint(_ip(host), parse_port(port_text, f"port in {text!r}"))
            except ValueError as e:
                raise ValueError(f"{text!r}: {e}") from None
            return cls("inet", endpoint=ep, legacy=True)
        if kind == "inet6":
            raise ValueError(f"{text!r}: write inet:[ADDRESS]:PORT")
        if ":" not in rest.rsplit("]", 1)[-1]:
            raise ValueError(f"{text!r}: inet needs HOST:PORT, for example inet:127.0.0.1:10025")
        try:
            return cls("inet", endpoint=Endpoint.parse(rest))
        except ValueError as e:
            raise ValueError(f"{text!r}: {e}") from None

    def __str__(self) -> str:
        """The one current syntax (``unix:/path``, ``inet:127.0.0.1:8891``, ``inet:[::1]:8891``)."""
        return f"unix:{self.path}" if self.endpoint is None else f"inet:{self.endpoint}"

    def libmilter(self) -> str:
        """The form libmilter (pymilter's ``runmilter``) takes: ``unix:/path``, ``inet:PORT@HOST``,
        ``inet6:PORT@HOST``."""
        if self.endpoint is None:
            return f"unix:{self.path}"
        kind = "inet6" if ":" in self.endpoint.host else "inet"
        return f"{kind}:{self.endpoint.port}@{self.endpoint.host}"

    def postfix(self, queue_directory: str = "") -> str:
        """The form Postfix's main.cf/master.cf take: ``unix:PATH`` (relative to the queue directory when under
        it, so that chrooted daemons reach it), ``inet:HOST:PORT`` (``inet:[::1]:PORT``)."""
        if self.endpoint is None:
            prefix = queue_directory.rstrip("/") + "/" if queue_directory else ""
            return "unix:" + (self.path[len(prefix) :] if prefix and self.path.startswith(prefix) else self.path)
        return f"inet:{self.endpoint}"
