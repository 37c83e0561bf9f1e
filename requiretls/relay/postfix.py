"""What the delivery agent takes from Postfix's own configuration, so that nothing is kept in sync by hand.

``postconf -x`` (values with ``$name`` expanded) is read at start and at every SIGHUP; tables
(``smtp_sasl_password_maps``, ``sender_dependent_relayhost_maps``) are queried with ``postmap -q`` when a
message needs them, so a ``postmap`` of the table takes effect at once, as it does for Postfix.

The commands run as ``[*command_prefix, "postconf", "-c", config_dir, ...]``: ``config_dir`` empty means
Postfix's default (``MAIL_CONFIG`` or the compiled-in directory), ``command_prefix`` runs them elsewhere
(``["chroot", "/srv/postfix-root"]`` when Postfix lives in a chroot, ``["ssh", "mailhost"]`` ...).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from requiretls.addresses import NextHop

log = logging.getLogger("requiretls")

#: The main.cf parameters the agent reads.
PARAMS = ("myhostname", "smtp_helo_name", "smtp_bind_address", "smtp_bind_address6", "relayhost",
          "sender_dependent_relayhost_maps", "smtp_sasl_auth_enable", "smtp_sasl_password_maps",
          "smtp_tls_CAfile", "smtp_tls_CApath", "smtp_tls_mandatory_protocols", "smtp_tls_mandatory_ciphers",
          "smtp_tls_exclude_ciphers", "smtp_tls_mandatory_exclude_ciphers", "smtp_tls_protocols", "smtp_tls_ciphers",
          "smtp_connect_timeout", "smtp_helo_timeout", "smtp_data_done_timeout", "lmtp_data_done_timeout",
          "mydestination", "virtual_alias_domains", "virtual_mailbox_domains")

#: The domain lists whose recipients Postfix delivers on this host (local(8), virtual(8) or its
#: virtual_transport, or a virtual alias domain, where an unexpanded address bounces as unknown): an
#: unplanned recipient there is handed back.  Not relay_domains: Postfix sends those on to another host,
#: which a handed-back REQUIRETLS recipient would reach without REQUIRETLS.
LOCAL_DOMAIN_LISTS = ("mydestination", "virtual_alias_domains", "virtual_mailbox_domains")

_TLS_VERSIONS = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
#: The agent's own floor; a Postfix setting only raises it.
AGENT_TLS_FLOOR = "TLSv1.2"
_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class PostfixConfigError(Exception):
    """postconf or postmap could not be run or failed: the caller defers (a message) or keeps the previous
    settings (a reload) or refuses to start."""


@dataclass(frozen=True, slots=True)
class PostfixCommands:
    config_dir: str = ""
    command_prefix: tuple[str, ...] = ()
    timeout: float = 20.0

    def _run(self, tool: str, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        cmd = [*self.command_prefix, tool, *(("-c", self.config_dir) if self.config_dir else ()), *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PostfixConfigError(f"{' '.join(cmd)}: {e}") from e

    def postconf(self, names: Sequence[str]) -> dict[str, str]:
        """``postconf -x NAME...``: each parameter's value, ``$name`` references expanded."""
        r = self._run("postconf", ["-x", *names])
        if r.returncode != 0:
            raise PostfixConfigError(f"postconf failed (exit {r.returncode}): {r.stderr.strip()[:300]}")
        out: dict[str, str] = {}
        for line in r.stdout.splitlines():
            name, sep, value = line.partition("=")
            if sep:
                out[name.strip()] = value.strip()
        return out

    def query(self, key: str, maps: Sequence[str]) -> str | None:
        """``postmap -q KEY MAP`` over each map in turn, as Postfix searches a list: the first answer, or None.
        A map that cannot be read raises (Postfix defers then too)."""
        for m in maps:
            r = self._run("postmap", ["-q", key, m])
            if r.returncode == 0:
                return r.stdout.strip().splitlines()[0] if r.stdout.strip() else ""
            if r.returncode == 1 and "fatal:" not in r.stderr:
                continue  # not found (warnings about other things are not errors)
            raise PostfixConfigError(f"postmap -q {key} {m}: {r.stderr.strip()[:300] or f'exit {r.returncode}'}")
        return None


def split_list(value: str) -> tuple[str, ...]:
    """A Postfix list value: items separated by commas and/or white space."""
    return tuple(x for x in value.replace(",", " ").split() if x)


def parse_relayhost(value: str) -> NextHop | tuple[NextHop, ...] | None:
    """``relayhost`` (or a sender_dependent_relayhost_maps answer): one next hop, or a list tried in order
    (Postfix 3.5+).  ValueError on a malformed hop."""
    hops = tuple(NextHop.parse(h) for h in split_list(value))
    if not hops:
        return None
    return hops[0] if len(hops) == 1 else hops


def tls_floor(value: str) -> str:
    """The lowest protocol version ``smtp_tls_mandatory_protocols`` allows that the agent allows too
    (TLSv1.2 or TLSv1.3): the Postfix 3.6+ form ``>=TLSv1.3`` or the exclusion list ``!SSLv2, !TLSv1.2``.
    An upper bound (``<=TLSv1.2``) is not followed: the agent never offers less than it can.  ValueError when
    the setting leaves neither TLSv1.2 nor TLSv1.3."""
    allowed = list(_TLS_VERSIONS[_TLS_VERSIONS.index(AGENT_TLS_FLOOR) :])
    for item in split_list(value):
        if item.startswith(">="):
            low = item[2:]
            if low not in _TLS_VERSIONS:
                raise ValueError(f"unknown protocol {low!r}")
            allowed = [v for v in allowed if _TLS_VERSIONS.index(v) >= _TLS_VERSIONS.index(low)]
        elif item.startswith("!"):
            allowed = [v for v in allowed if v != item[1:]]
        elif item.startswith("<=") or item in _TLS_VERSIONS:
            continue
        else:
            raise ValueError(f"unknown protocol {item!r}")
    if not allowed:
        raise ValueError("no protocol version of TLSv1.2 or later left")
    return allowed[0]


def parse_time(value: str, default: float) -> float:
    """A Postfix time value (``30s``, ``5m``, ``300``: seconds without a unit); ``default`` when empty or 0."""
    v = value.strip().lower()
    if not v:
        return default
    unit = _TIME_UNITS.get(v[-1], 0)
    number = v[:-1] if unit else v
    try:
        seconds = float(number) * (unit or 1)
    except ValueError as e:
        raise ValueError(f"not a time: {value!r}") from e
    return seconds if seconds > 0 else default


@dataclass(frozen=True, slots=True)
class DomainList:
    """A Postfix domain list (mydestination ...): names (``.example.org`` also matches subdomains) and lookup
    tables, which are queried with the domain as key, as Postfix's match lists do."""

    names: frozenset[str] = frozenset()
    tables: tuple[str, ...] = ()

    @classmethod
    def parse(cls, values: Sequence[str]) -> DomainList:
        names: set[str] = set()
        tables: list[str] = []
        for value in values:
            for item in split_list(value):
                if item.startswith("!"):
                    continue  # an exclusion: never makes a domain local
                if ":" in item or item.startswith("/"):
                    tables.append(item if ":" in item else f"texthash:{item}")
                else:
                    names.add(item.lower().rstrip("."))
        return cls(frozenset(names), tuple(tables))

    def __bool__(self) -> bool:
        return bool(self.names or self.tables)

    def matches(self, domain: str, commands: PostfixCommands) -> bool:
        d = domain.lower().rstrip(".")
        if not d:
            return False
        if d in self.names or any(d.endswith(n) for n in self.names if n.startswith(".")):
            return True
        return bool(self.tables) and commands.query(d, self.tables) is not None


@dataclass(frozen=True, slots=True)
class PostfixView:
    """The Postfix settings the agent uses, as read at start or at the last SIGHUP."""

    commands: PostfixCommands = field(default_factory=PostfixCommands)
    helo_name: str = ""
    bind_address: str = ""
    bind_address6: str = ""
    relayhost: NextHop | tuple[NextHop, ...] | None = None
    sender_relayhost_maps: tuple[str, ...] = ()
    sasl_maps: tuple[str, ...] = ()  # empty unless smtp_sasl_auth_enable = yes
    cafile: str = ""
    capath: str = ""
    #: smtp_tls_mandatory_protocols as a floor: TLSv1.2 (the agent's own) or TLSv1.3.
    tls_min_version: str = AGENT_TLS_FLOOR
    #: smtp_tls_mandatory_ciphers = high: only HIGH cipher suites (TLS 1.2); lower grades leave the agent's own.
    tls_high_ciphers: bool = False
    #: smtp_tls_exclude_ciphers (every TLS session of the agent) and smtp_tls_mandatory_exclude_ciphers (its
    #: authenticated ones: REQUIRETLS), as Postfix applies them.
    tls_exclude_ciphers: tuple[str, ...] = ()
    tls_mandatory_exclude_ciphers: tuple[str, ...] = ()
    #: smtp_tls_protocols and smtp_tls_ciphers: the same for opportunistic TLS (opt-out mail).
    tls_opportunistic_min_version: str = AGENT_TLS_FLOOR
    tls_opportunistic_high_ciphers: bool = False
    connect_timeout: float = 30.0
    helo_timeout: float = 300.0
    data_done_timeout: float = 600.0
    #: How long Postfix's LMTP client waits for the agent's replies after the message: the agent's own waits
    #: must fit in it, or Postfix gives up and sends the message again.
    lmtp_data_done_timeout: float = 600.0
    #: mydestination, virtual_alias_domains, virtual_mailbox_domains.
    local_domains: DomainList = field(default_factory=DomainList)

    @classmethod
    def read(cls, commands: PostfixCommands) -> PostfixView:
        v = commands.postconf(PARAMS)
        missing = [p for p in ("myhostname", "relayhost") if p not in v]
        if missing:
            raise PostfixConfigError(f"postconf did not report {', '.join(missing)}")
        try:
            relayhost = parse_relayhost(v.get("relayhost", ""))
        except ValueError as e:
            raise PostfixConfigError(f"relayhost = {v.get('relayhost')}: {e}") from e
        helo = v.get("smtp_helo_name") or v["myhostname"]
        floors = {}
        for name in ("smtp_tls_mandatory_protocols", "smtp_tls_protocols"):
            try:
                floors[name] = tls_floor(v.get(name, ""))
            except ValueError as e:
                raise PostfixConfigError(f"{name} = {v.get(name)}: {e}") from e
        floor = floors["smtp_tls_mandatory_protocols"]
        try:
            times = {n: parse_time(v.get(n, ""), d) for n, d in (
                ("smtp_connect_timeout", 30.0), ("smtp_helo_timeout", 300.0), ("smtp_data_done_timeout", 600.0),
                ("lmtp_data_done_timeout", 600.0))}
        except ValueError as e:
            raise PostfixConfigError(str(e)) from e
        sasl_on = v.get("smtp_sasl_auth_enable", "no").lower() in ("yes", "true", "on", "1")
        return cls(
            commands=commands,
            helo_name=helo,
            bind_address=v.get("smtp_bind_address", ""),
            bind_address6=v.get("smtp_bind_address6", ""),
            relayhost=relayhost,
            sender_relayhost_maps=split_list(v.get("sender_dependent_relayhost_maps", "")),
            sasl_maps=split_list(v.get("smtp_sasl_password_maps", "")) if sasl_on else (),
            cafile=v.get("smtp_tls_CAfile", ""),
            capath=v.get("smtp_tls_CApath", ""),
            tls_min_version=floor,
            tls_high_ciphers=v.get("smtp_tls_mandatory_ciphers", "").strip().lower() == "high",
            tls_exclude_ciphers=split_list(v.get("smtp_tls_exclude_ciphers", "")),
            tls_mandatory_exclude_ciphers=split_list(v.get("smtp_tls_mandatory_exclude_ciphers", "")),
            tls_opportunistic_min_version=floors["smtp_tls_protocols"],
            tls_opportunistic_high_ciphers=v.get("smtp_tls_ciphers", "").strip().lower() == "high",
            connect_timeout=times["smtp_connect_timeout"],
            helo_timeout=times["smtp_helo_timeout"],
            data_done_timeout=times["smtp_data_done_timeout"],
            lmtp_data_done_timeout=times["lmtp_data_done_timeout"],
            local_domains=DomainList.parse([v.get(n, "") for n in LOCAL_DOMAIN_LISTS]),
        )

    def is_local_domain(self, domain: str) -> bool:
        """Whether Postfix delivers ``domain`` on this host (:data:`LOCAL_DOMAIN_LISTS`).  Raises
        PostfixConfigError when a table of those lists cannot be read."""
        return self.local_domains.matches(domain, self.commands)

    def sender_relayhost(self, sender: str) -> NextHop | tuple[NextHop, ...] | None:
        """sender_dependent_relayhost_maps for ``sender``: the full address, then ``@domain`` (Postfix's order
        for this table); None when no entry (the relayhost applies)."""
        if not self.sender_relayhost_maps or not sender or "@" not in sender:
            return None
        domain = sender.rpartition("@")[2]
        for key in (sender, f"@{domain}"):
            value = self.commands.query(key, self.sender_relayhost_maps)
            if value:
                try:
                    return parse_relayhost(value)
                except ValueError as e:
                    raise PostfixConfigError(f"sender_dependent_relayhost_maps {key} = {value}: {e}") from e
        return None

    def sasl_keys(self, nexthop: str, host: str, domain: str) -> list[str]:
        """The keys Postfix's smtp client looks up in smtp_sasl_password_maps, in its order: the next hop as
        written in relayhost/transport (``[host]:port``, ``[host]``, ``domain``), then the remote host name, then
        the destination domain."""
        keys = [nexthop, host.lower(), domain.lower()]
        return [k for i, k in enumerate(keys) if k and k not in keys[:i]]

    def sasl_credentials(self, nexthop: str, host: str, domain: str) -> str | None:
        if not self.sasl_maps:
            return None
        for key in self.sasl_keys(nexthop, host, domain):
            value = self.commands.query(key, self.sasl_maps)
            if value:
                return value
        return None
