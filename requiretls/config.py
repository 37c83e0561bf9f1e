"""One TOML file -> typed settings.  Every error names the file, the line and the key.

Each setting is declared once, in :data:`SCHEMA`, with its type, default and documentation (the manual page
``requiretls.toml(5)`` and the commented default file are generated from it).  Unknown sections and keys are
errors, not ignored: a typo must not silently leave a security setting at its default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from requiretls.errors import ConfigError
from requiretls.policy.local import DEFAULT_OPTOUT_COOKIE, DEFAULT_REQUIRETLS_COOKIE, LocalPolicy
from requiretls.policy.model import OptoutFrom, PreflightMode
from requiretls.policy.table import PolicyTable

DEFAULT_CONFIG_FILE = "/etc/requiretls/requiretls.toml"

Checker = Callable[[Any], str | None]


@dataclass(frozen=True, slots=True)
class Setting:
    """One configuration key: its TOML type, default, and one paragraph of documentation."""

    type: type | tuple[type, ...]
    default: Any
    doc: str
    check: Checker | None = None


def _choice(*values: str) -> Checker:
    def check(v: Any) -> str | None:
        return None if v in values else f"must be one of {', '.join(map(repr, values))}, not {v!r}"

    return check


def _networks(v: Any) -> str | None:
    for item in v:
        if not isinstance(item, str):
            return f"items must be strings, not {item!r}"
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{item!r} is not an IP network"
    return None


def _resolver(v: Any) -> str | None:
    if v == "":
        return None
    host, port = split_hostport(v)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"{v!r} is not IP or IP:PORT ([IPv6]:PORT)"
    if port is not None and not 0 < port < 65536:
        return f"port out of range in {v!r}"
    return None


def _positive(v: Any) -> str | None:
    return None if v > 0 else f"must be greater than 0, not {v!r}"


def _cookie(v: Any) -> str | None:
    return None if v.strip() == v and v.isprintable() else f"must be printable without outer spaces: {v!r}"


def _milter_socket(v: Any) -> str | None:
    if re.fullmatch(r"(unix|local):/\S+", v) or re.fullmatch(r"inet6?:\d{1,5}(@\S+)?", v):
        return None
    return f"must be unix:/absolute/path or inet:PORT@ADDRESS, not {v!r}"


def _listen_list(v: Any) -> str | None:
    for item in v:
        if not isinstance(item, str) or not (
            re.fullmatch(r"unix:/\S+", item) or re.fullmatch(r"inet:(\[[0-9a-fA-F:.]+\]|[0-9.]+):\d{1,5}", item)
        ):
            return f"{item!r}: use unix:/absolute/path or inet:ADDRESS:PORT"
    return None


def _octal_mode(v: Any) -> str | None:
    return None if re.fullmatch(r"0?[0-7]{3}", v) else f"must be an octal mode such as 0660, not {v!r}"


def _relayhost(v: Any) -> str | None:
    if v == "" or re.fullmatch(r"\[[A-Za-z0-9.-]+\](:\d{1,5})?|[A-Za-z0-9.-]+(:\d{1,5})?", v):
        return None
    return f"must be [host]:port or host, not {v!r}"


def _version(v: Any) -> str | None:
    return None if v == "" or re.fullmatch(r"\d+\.\d+(\.\d+)?", v) else f"must be X.Y, not {v!r}"


def split_hostport(v: str) -> tuple[str, int | None]:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` -> (host, port or None); a port that is not a number gives -1."""
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", v)
    if m:
        return m.group(1), int(m.group(2)) if m.group(2) else None
    if v.count(":") == 1:
        host, port = v.split(":")
        return host, int(port) if port.isdigit() else -1
    return v, None


SCHEMA: Mapping[str, Mapping[str, Setting]] = {
    "policy": {
        "table": Setting(
            str,
            "",
            "Destination policy table: Postfix smtp_tls_policy_maps syntax (domain or .parent, TLS level, "
            "attributes) plus optout=yes|no and requiretls=yes. Relative to the config file. Empty: none.",
        ),
        "sender_table": Setting(
            str,
            "",
            "Sender rules (user@domain, @domain, domain, .parent, user@, <>) with optout=yes|no and "
            "requiretls=yes. Relative to the config file. Empty: none.",
        ),
        "optout_from": Setting(
            str,
            "any",
            "Who may opt a message out with TLS-Required: No: any (RFC 8689, Postfix 3.10), trusted "
            "(SASL-authenticated or from trusted_networks), none. Subject cookies also need a trusted client.",
            _choice("any", "trusted", "none"),
        ),
        "trusted_networks": Setting(
            list,
            ["127.0.0.0/8", "::1/128"],
            "Client networks whose mail counts as trusted for opt-out and subject cookies.",
            _networks,
        ),
        "requiretls_cookie": Setting(
            str, DEFAULT_REQUIRETLS_COOKIE, "Subject cookie that tags a message REQUIRETLS (trusted clients).", _cookie
        ),
        "optout_cookie": Setting(
            str, DEFAULT_OPTOUT_COOKIE, "Subject cookie that opts a message out (trusted clients).", _cookie
        ),
        "preflight": Setting(
            str,
            "off",
            "Check at submission whether a REQUIRETLS message's destinations can satisfy it: off, warn "
            "(log only) or reject (550 5.7.30 at once instead of a bounce later).",
            _choice("off", "warn", "reject"),
        ),
    },
    "dns": {
        "resolver": Setting(
            str,
            "",
            "Trusted DNSSEC-validating resolver, IP or IP:PORT. Empty: the first nameserver of "
            "/etc/resolv.conf. It must validate: its AD bit is trusted.",
            _resolver,
        ),
        "timeout": Setting((int, float), 5.0, "Seconds for one DNS lookup before it fails (defer).", _positive),
    },
    "mta_sts": {
        "enabled": Setting(bool, True, "Look up MTA-STS policies (RFC 8461) for destinations without DANE."),
        "cafile": Setting(
            str, "", "CA bundle for MTA-STS policy hosts' certificates. Empty: the system trust store."
        ),
        "fetch_timeout": Setting((int, float), 30.0, "Seconds for one MTA-STS policy fetch.", _positive),
    },
    "cache": {
        "backend": Setting(
            str,
            "memory",
            "Where DNS and MTA-STS results are cached: memory (one process), sqlite (survives restarts, one "
            "host) or redis (shared by several MTAs). A cache failure falls back to a fresh lookup.",
            _choice("memory", "sqlite", "redis"),
        ),
        "sqlite_path": Setting(str, "/var/lib/requiretls/cache.sqlite", "SQLite cache file (backend = sqlite)."),
        "redis_url": Setting(str, "redis://127.0.0.1:6379/0", "Redis URL (backend = redis)."),
        "max_entries": Setting(
            int, 100_000,
            "Most DNS answers and MTA-STS results the memory backend holds (a DANE destination takes about 5, "
            "~200 bytes each); the oldest go first. The local validating resolver keeps its own cache.",
            _positive,
        ),
    },
    "policyd": {
        "listen": Setting(
            list,
            ["unix:/var/spool/postfix/requiretls/policyd.sock"],
            "Where the socketmap service listens: unix:/path and/or inet:127.0.0.1:PORT. Under Postfix's "
            "queue directory a unix socket is reachable from the chrooted smtp client.",
            _listen_list,
        ),
        "metrics": Setting(str, "", "Prometheus metrics address HOST:PORT (loopback). Empty: off.", _resolver),
        "answer_ttl": Setting(
            (int, float), 60.0, "Seconds a ready answer is reused (never longer than the DNS TTL).", _positive
        ),
        "lookup_timeout": Setting(
            (int, float), 30.0, "Seconds a destination lookup may take before the answer is TEMP.", _positive
        ),
        "answer_cache_size": Setting(
            int, 100_000,
            "Most ready answers kept (one per map name and destination, ~250 bytes each); the oldest go first.",
            _positive,
        ),
    },
    "milter": {
        "socket": Setting(
            str,
            "unix:/var/spool/postfix/requiretls/milter.sock",
            "Where the milter listens, in libmilter form: unix:/path or inet:PORT@127.0.0.1. A unix socket "
            "avoids the ~40 ms Nagle stalls of TCP; under Postfix's queue directory it is reachable from the "
            "chrooted smtpd.",
            _milter_socket,
        ),
        "socket_group": Setting(
            str, "postfix", "Group that owns the unix socket's directory (setgid), so that Postfix can connect."
        ),
        "socket_mode": Setting(
            str, "0660", "Octal mode of the unix socket. 0666 for a Postfix whose ids differ (a chroot).", _octal_mode
        ),
        "timeout": Setting(int, 30, "Seconds libmilter waits for the MTA before dropping a connection.", _positive),
        "preflight_probe": Setting(
            bool,
            False,
            "With policy.preflight: also connect to the MX (STARTTLS, certificate, REQUIRETLS after STARTTLS), "
            "so that a missing REQUIRETLS is refused at submission (5.7.30), not only an unvalidated MX (5.7.10).",
        ),
        "preflight_timeout": Setting(
            (int, float), 10.0, "Seconds the pre-flight may take; after that the message is accepted.", _positive
        ),
        "mta": Setting(
            str,
            "auto",
            "Which MTA runs the milter: auto (from the v macro, which Postfix sends; none means Postfix), postfix "
            "or sendmail. On Sendmail no route headers are added and REQUIRETLS-tagged mail is refused (550 "
            "5.7.30): nothing there could enforce it.",
            _choice("auto", "postfix", "sendmail"),
        ),
        "postfix_version": Setting(
            str,
            "",
            "Postfix version to steer for (X.Y). Empty: from the MTA's v macro at each connection.",
            _version,
        ),
    },
    "relay": {
        "listen": Setting(
            str,
            "unix:/var/spool/postfix/requiretls/relay.sock",
            "Where the REQUIRETLS delivery agent takes LMTP from Postfix: unix:/path or inet:PORT@ADDRESS.",
            _milter_socket,
        ),
        "relayhost": Setting(
            str,
            "",
            "Postfix's relayhost ([host]:port) when it has one: the agent sends REQUIRETLS mail there, under the "
            "same rules as to an MX (the relay's name is the MTA-STS policy domain). Empty: MX lookups.",
            _relayhost,
        ),
        "cafile": Setting(str, "", "CA bundle for MX certificates (PKIX). Empty: the system trust store."),
        "helo_name": Setting(str, "", "Name the agent gives in EHLO. Empty: this host's FQDN."),
        "timeout": Setting((int, float), 60.0, "Seconds for each SMTP step with an MX.", _positive),
        "reinject": Setting(
            str,
            "127.0.0.1:10026",
            "Loopback address:port of the re-injection smtpd (no milters, no FILTER) through which the agent "
            "hands back recipients that Postfix delivers itself (local, virtual, transport_maps, relayhost).",
            _resolver,
        ),
    },
    "log": {
        "target": Setting(str, "stderr", "Where daemons log: stderr (journal) or syslog (mail facility).",
                          _choice("stderr", "syslog")),
        "level": Setting(str, "info", "Least severe level logged: debug, info, warning, error.",
                         _choice("debug", "info", "warning", "error")),
    },
}


@dataclass(frozen=True, slots=True)
class Settings:
    """The loaded configuration. ``values[section][key]`` has every key, defaults filled in."""

    filename: str
    values: Mapping[str, Mapping[str, Any]]
    local_policy: LocalPolicy

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Where each ``[section]`` and ``section.key`` is written, for error messages (tomllib gives no positions)."""
    lines: dict[tuple[str, ...], int] = {}
    section: tuple[str, ...] = ()
    header = re.compile(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
    keyline = re.compile(r"\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_.-]+(?:\s*\.\s*[A-Za-z0-9_-]+)*)\s*=")
    for n, line in enumerate(text.splitlines(), 1):
        m = header.match(line)
        if m:
            section = tuple(p.strip().strip("\"'") for p in m.group(1).split("."))
            lines.setdefault(section, n)
            continue
        m = keyline.match(line)
        if m:
            path = section + tuple(p.strip().strip("\"'") for p in m.group(1).split("."))
            lines.setdefault(path, n)
    return lines


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(names.get(x, x.__name__) for x in ts)


def parse(text: str, filename: str) -> dict[str, dict[str, Any]]:
    """Parse and validate TOML text against :data:`SCHEMA`; the result has every key of every section."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        line = int(m.group(1)) if m else None
        detail = re.sub(r" \(at line.*\)$", "", msg)
        raise ConfigError(filename, line, None, f"TOML syntax error: {detail}") from e
    where = _key_lines(text)
    values: dict[str, dict[str, Any]] = {
        s: {k: list(v.default) if isinstance(v.default, list) else v.default for k, v in keys.items()}
        for s, keys in SCHEMA.items()
    }
    for section, body in data.items():
        if section not in SCHEMA:
            raise ConfigError(filename, where.get((section,)), section, "unknown section")
        if not isinstance(body, dict):
            raise ConfigError(filename, where.get((section,)), section, "must be a [section] table")
        for key, value in body.items():
            line = where.get((section, key))
            name = f"{section}.{key}"
            spec = SCHEMA[section].get(key)
            if spec is None:
                raise ConfigError(filename, line, name, "unknown key")
            ok_types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
            if not isinstance(value, ok_types) or (isinstance(value, bool) and bool not in ok_types):
                raise ConfigError(filename, line, name, f"must be {_type_name(spec.type)}, not {value!r}")
            problem = spec.check(value) if spec.check else None
            if problem:
                raise ConfigError(filename, line, name, problem)
            values[section][key] = value
    return values


def _read(path: str, purpose: str, filename: str, line: int | None, key: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(filename, line, key, f"cannot read {purpose} {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, None, f"not UTF-8 text: {e.reason}") from e


def build_local_policy(values: Mapping[str, Mapping[str, Any]], filename: str, text: str = "") -> LocalPolicy:
    """Load the tables named in ``[policy]`` (paths relative to the config file) and build the policy."""
    p = values["policy"]
    where = _key_lines(text)
    base = os.path.dirname(os.path.abspath(filename)) if filename else os.getcwd()
    tables: dict[str, PolicyTable] = {}
    for key, kind in (("table", "destination"), ("sender_table", "sender")):
        path = p[key]
        if not path:
            tables[key] = PolicyTable.empty(kind)  # type: ignore[arg-type]
            continue
        full = os.path.join(base, path)
        body = _read(full, "table", filename, where.get(("policy", key)), f"policy.{key}")
        tables[key] = PolicyTable.parse(body, full, kind)  # type: ignore[arg-type]
    return LocalPolicy(
        table=tables["table"],
        senders=tables["sender_table"],
        optout_from=OptoutFrom(p["optout_from"]),
        trusted_networks=tuple(ipaddress.ip_network(n, strict=False) for n in p["trusted_networks"]),
        requiretls_cookie=p["requiretls_cookie"],
        optout_cookie=p["optout_cookie"],
        preflight=PreflightMode(p["preflight"]),
    )


def load(filename: str | None) -> Settings:
    """Load a config file, or the built-in defaults when ``filename`` is None."""
    if filename is None:
        values = parse("", "<defaults>")
        return Settings("<defaults>", values, build_local_policy(values, ""))
    text = _read(filename, "config file", filename, None, "")
    values = parse(text, filename)
    return Settings(filename, values, build_local_policy(values, filename, text))


def render_default_config() -> str:
    """A commented config file with every key at its default (shipped as /etc/requiretls/requiretls.toml)."""
    out = ["# requiretls configuration. Every key is shown with its default value.", ""]
    for section, keys in SCHEMA.items():
        out.append(f"[{section}]")
        for key, spec in keys.items():
            out.extend(f"# {line}" for line in _wrap(spec.doc))
            out.append(f"#{key} = {_toml_value(spec.default)}")
        out.append("")
    return "\n".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _wrap(text: str, width: int = 100) -> list[str]:
    lines: list[str] = []
    cur = ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    if cur:
        lines.append(cur)
    return lines
