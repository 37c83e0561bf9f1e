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
          "smtp_tls_CAfile", "smtp_tls_CApath")


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
        )

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
