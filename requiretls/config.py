"""One TOML file -> one frozen, typed settings object per section.  Every error names the file, the line and
the key.

Each setting is declared once, in :data:`SCHEMA`, with its type, default, bounds and documentation (the manual
page ``requiretls.toml(5)`` and the commented default file are generated from it).  Unknown sections and keys
are errors, not ignored: a typo must not silently leave a security setting at its default.  Values are parsed
once, here, into typed values (:class:`~requiretls.addresses.NextHop`,
:class:`~requiretls.addresses.ListenAddress`, :class:`~requiretls.addresses.Endpoint`, enums, tuples); each
daemon is handed only the section objects it uses.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from requiretls.addresses import Backend, Endpoint, ListenAddress, NextHop
from requiretls.errors import ConfigError
from requiretls.policy.local import DEFAULT_OPTOUT_COOKIE, DEFAULT_REQUIRETLS_COOKIE, LocalPolicy
from requiretls.policy.model import OptoutFrom, PreflightMode
from requiretls.policy.table import PolicyTable

DEFAULT_CONFIG_FILE = "/etc/requiretls/requiretls.toml"
log = logging.getLogger("requiretls")

Checker = Callable[[Any], str | None]
#: TOML value -> typed value; ValueError's text is the message the admin sees.
Converter = Callable[[Any], Any]

#: Upper bounds shared by the keys (documented in each key's text).
MAX_TIMEOUT = 3600.0
MAX_TTL = 86400.0
MAX_ENTRIES = 10_000_000


@dataclass(frozen=True, slots=True)
class Setting:
    """One configuration key: its TOML type, default, one paragraph of documentation, an optional check of the
    TOML value and an optional conversion to the typed value the daemons get."""

    type: type | tuple[type, ...]
    default: Any
    doc: str
    check: Checker | None = None
    convert: Converter | None = None


def _strings(v: Any) -> str | None:
    for item in v:
        if not isinstance(item, str) or not item.strip() or any(c.isspace() for c in item.strip()):
            return f"items must be non-empty strings without spaces, not {item!r}"
    return None


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


def _fmt(x: float) -> str:
    """A bound as an admin writes it in TOML (``3600``, ``10_000_000``)."""
    if x != int(x):
        return str(x)
    return f"{int(x):_}" if x >= 10_000 else str(int(x))


def _range(low: float, high: float, *, inclusive_low: bool = False) -> Checker:
    """A finite number in (low, high] (or [low, high]); inf and nan are refused (TOML allows both)."""

    def check(v: Any) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number, not {v!r}"
        if (v < low if inclusive_low else v <= low) or v > high:
            lo = f"at least {_fmt(low)}" if inclusive_low else f"greater than {_fmt(low)}"
            return f"must be {lo} and at most {_fmt(high)}, not {v!r}"
        return None

    return check


def _number(types: type | tuple[type, ...], default: float, doc: str, high: float, low: float = 0,
            *, inclusive_low: bool = False, unit: str = "") -> Setting:
    """A number key whose bounds are checked and stated in its documentation."""
    lo = f"at least {_fmt(low)}" if inclusive_low else f"more than {_fmt(low)}"
    bounds = f" Range: {lo}, at most {_fmt(high)}{unit}."
    convert: Converter = int if types is int else float
    return Setting(types, default, doc + bounds, _range(low, high, inclusive_low=inclusive_low), convert)


def _timeout(default: float, doc: str, types: type | tuple[type, ...] = (int, float)) -> Setting:
    return _number(types, default, doc, MAX_TIMEOUT, unit=" seconds")


def _entries(default: int, doc: str) -> Setting:
    return _number(int, default, doc, MAX_ENTRIES, 1, inclusive_low=True)


def _cookie(v: Any) -> str | None:
    return None if v.strip() == v and v.isprintable() else f"must be printable without outer spaces: {v!r}"


def _octal_mode(v: Any) -> str | None:
    return None if re.fullmatch(r"0?[0-7]{3}", v) else f"must be an octal mode such as 0660, not {v!r}"


def _version(v: Any) -> str | None:
    return None if v == "" or re.fullmatch(r"\d+\.\d+(\.\d+)?", v) else f"must be X.Y, not {v!r}"


def _endpoint(default_port: int | None) -> Converter:
    def convert(v: str) -> Endpoint | None:
        return Endpoint.parse(v, default_port) if v else None

    return convert


def _nexthop(v: str) -> NextHop | None:
    return NextHop.parse(v) if v else None


def _listen_list(v: list[Any]) -> tuple[ListenAddress, ...]:
    out = []
    for item in v:
        if not isinstance(item, str):
            raise ValueError(f"items must be strings, not {item!r}")
        out.append(ListenAddress.parse(item))
    if not out:
        raise ValueError("give at least one address")
    return tuple(out)


def _path_or_none(v: str) -> str | None:
    return v or None


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
            OptoutFrom,
        ),
        "trusted_networks": Setting(
            list,
            ["127.0.0.0/8", "::1/128"],
            "Client networks whose mail counts as trusted for opt-out and subject cookies.",
            _networks,
            lambda v: tuple(ipaddress.ip_network(n, strict=False) for n in v),
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
            PreflightMode,
        ),
    },
    "dns": {
        "resolver": Setting(
            str,
            "",
            "Trusted DNSSEC-validating resolver, IP or IP:PORT. Empty: the first nameserver of "
            "/etc/resolv.conf. It must validate: its AD bit is trusted. Port: 53 unless given.",
            convert=_endpoint(53),
        ),
        "timeout": _timeout(5.0, "Seconds for one DNS lookup before it fails (defer)."),
        "untrusted_resolver": Setting(
            str,
            "refuse",
            "What policyd, relay and the milter's pre-flight do at start when the resolver's AD bit cannot be "
            "trusted (RFC 7672 section 2.1.1): it does not validate (no AD on the root DNSKEY answer), or, with "
            "resolver empty, the first nameserver of /etc/resolv.conf is not on loopback. refuse: log an error "
            "and exit; warn: log a warning at start and run. A resolver named in resolver is trusted to be on a "
            "trusted path, but must still validate. A resolver that does not answer at start is logged and the "
            "daemon runs: its lookups defer until it answers.",
            _choice("refuse", "warn"),
        ),
        "resolver_check_name": Setting(
            str,
            ".",
            "The DNSSEC-signed name whose DNSKEY answer must come back with the AD bit for the resolver to count "
            "as validating (at daemon start and in requiretls check). The default, the root zone (.), works on "
            "the Internet; name a signed zone of your own where the root is not reachable.",
        ),
    },
    "mta_sts": {
        "enabled": Setting(bool, True, "Look up MTA-STS policies (RFC 8461) for destinations without DANE."),
        "cafile": Setting(
            str, "", "CA bundle for MTA-STS policy hosts' certificates. Empty: the system trust store.",
            convert=_path_or_none,
        ),
        "fetch_timeout": _timeout(30.0, "Seconds for one MTA-STS policy fetch."),
        "retry_after_failure": _timeout(
            300.0,
            "Seconds a failed policy fetch is not tried again for the same policy id (RFC 8461 section 3.3 asks "
            "senders to rate-limit fetches of a host that fails). Meanwhile ordinary mail is sent as if the "
            "domain had no policy and REQUIRETLS mail is deferred.",
        ),
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
        "max_entries": _entries(
            100_000,
            "Most DNS answers and MTA-STS results the memory backend holds (a DANE destination takes about 5, "
            "~200 bytes each); the oldest go first. The local validating resolver keeps its own cache.",
        ),
    },
    "policyd": {
        "listen": Setting(
            list,
            ["unix:/var/spool/postfix/requiretls/policyd.sock"],
            "Where the socketmap service listens, one or more of unix:/absolute/path and inet:HOST:PORT "
            "(inet:[::1]:PORT for IPv6), the syntax of every daemon's listen key. Under Postfix's queue "
            "directory a unix socket is reachable from the chrooted smtp client.",
            convert=_listen_list,
        ),
        "metrics": Setting(
            str, "",
            "Prometheus metrics address of policyd, IP:PORT ([IPv6]:PORT) (docs/monitoring.md). Only a loopback "
            "address unless metrics_allow_remote = true. Empty: off.",
            convert=_endpoint(None),
        ),
        "metrics_allow_remote": Setting(
            bool, False,
            "Allow a metrics address that is not loopback, for every daemon's metrics key (the endpoint has no "
            "authentication; put a firewall "
            "in front of it).",
        ),
        "answer_ttl": _number(
            (int, float), 60.0, "Seconds a ready answer is reused (never longer than the DNS TTL).", MAX_TTL,
            unit=" seconds",
        ),
        "lookup_timeout": _timeout(30.0, "Seconds a destination lookup may take before the answer is TEMP."),
        "answer_cache_size": _entries(
            100_000,
            "Most ready answers kept (one per map name and destination, ~250 bytes each); the oldest go first.",
        ),
        "idle_timeout": _timeout(
            300.0,
            "Seconds a client connection may stay idle (no request, no answer pending) before policyd closes "
            "it; Postfix reconnects when it next needs an answer.",
        ),
        "answer_attributes": Setting(
            str,
            "map",
            "Whether MTA-STS answers carry Postfix 3.10+'s TLSRPT policy attributes (policy_type, policy_domain, "
            "mx_host_pattern, policy_string), which Postfix needs to report MTA-STS results and to enforce the "
            "policy's MX patterns itself (smtp_tls_enforce_sts_mx_patterns). map: when the map name asks for them "
            "(default+tlsrpt; postfix-config writes that for Postfix 3.10 and later); plain: never (Postfix "
            "before 3.10 refuses an answer with them); tlsrpt: always. The MX patterns are enforced exactly "
            "either way.",
            _choice("map", "plain", "tlsrpt"),
        ),
    },
    "milter": {
        "socket": Setting(
            str,
            "unix:/var/spool/postfix/requiretls/milter.sock",
            "Where the milter listens: unix:/absolute/path or inet:HOST:PORT (inet:[::1]:PORT). The old "
            "libmilter forms inet:PORT@HOST and local:/path are still read, with a warning. A unix socket "
            "avoids the ~40 ms Nagle stalls of TCP; under Postfix's queue directory it is reachable from the "
            "chrooted smtpd.",
            convert=ListenAddress.parse,
        ),
        "socket_group": Setting(
            str, "postfix", "Group that owns the unix socket's directory (setgid), so that Postfix can connect."
        ),
        "socket_mode": Setting(
            str, "0660", "Octal mode of the unix socket. 0666 for a Postfix whose ids differ (a chroot).", _octal_mode,
            lambda v: int(v, 8),
        ),
        "timeout": _timeout(30, "Seconds libmilter waits for the MTA before dropping a connection.", int),
        "preflight_probe": Setting(
            bool,
            False,
            "With policy.preflight: also connect to the MX (STARTTLS, certificate, REQUIRETLS after STARTTLS), "
            "so that a missing REQUIRETLS is refused at submission (5.7.30), not only an unvalidated MX (5.7.10). "
            "The probes use relay.cafile and relay.helo_name.",
        ),
        "preflight_timeout": _timeout(10.0, "Seconds the pre-flight may take; after that the message is accepted."),
        "optout_audit": Setting(
            bool, True,
            "After accepting an opt-out message (TLS-Required: No), look up its recipient domains that go to their "
            "MX and log, per message, each whose DANE or MTA-STS policy the opt-out set aside (optout_set_aside=), "
            "counted in the metrics. The message is never held for it; the lookups are the cached ones of the "
            "policy service and the agent.",
        ),
        "metrics": Setting(
            str, "",
            "Prometheus metrics address of the milter, IP:PORT ([IPv6]:PORT) (docs/monitoring.md). Only a loopback "
            "address unless policyd.metrics_allow_remote = true. Empty: off.",
            convert=_endpoint(None),
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
            "Where the REQUIRETLS delivery agent takes LMTP from Postfix: unix:/absolute/path or inet:HOST:PORT "
            "(inet:[::1]:PORT). The old form inet:PORT@HOST is still read, with a warning.",
            convert=ListenAddress.parse,
        ),
        "relayhost": Setting(
            str,
            "",
            "Postfix's relayhost when it has one, in Postfix's next-hop syntax: [host] or [host]:port is that "
            "host's own addresses (no MX lookup), host or host:port the MX hosts of that domain, "
            "[192.0.2.1] or [ipv6:2001:db8::1] an address; the port defaults to 25. The agent sends "
            "REQUIRETLS mail there, under the same rules as to an MX (the relay's name is the MTA-STS policy "
            "domain, its TLSA records are those of its port); the milter reads it too, so that recipients "
            "routed there are not handed back to Postfix. Empty: the agent uses Postfix's relayhost (and "
            "sender_dependent_relayhost_maps) when relay.postfix_settings is on, else MX lookups.",
            convert=_nexthop,
        ),
        "local_transports": Setting(
            list,
            [],
            "Postfix transports that deliver on this host besides local, virtual, discard and error, as MAILER "
            "or MAILER:NEXTHOP the way Postfix resolves them (e.g. \"lmtp:unix:private/dovecot-lmtp\", "
            "\"dovecot\"): the agent hands REQUIRETLS recipients routed there back to Postfix. A recipient "
            "that Postfix routes to any other non-SMTP transport (LMTP or a pipe to elsewhere) bounces with "
            "5.7.30: nothing would carry REQUIRETLS on from there. The milter reads it too.",
            _strings,
            convert=lambda v: frozenset(str(x).strip() for x in v),
        ),
        "local_domains": Setting(
            list,
            [],
            "Domains Postfix delivers on this host, e.g. [\"example.org\"]. A virtual alias is expanded by "
            "Postfix after the milter saw the message, so the agent can get an expanded recipient nobody "
            "planned; in one of these domains it is handed back to Postfix, elsewhere it goes to its domain's "
            "MX under REQUIRETLS (or the relayhost). Empty: Postfix's mydestination, virtual_alias_domains and "
            "virtual_mailbox_domains (tables in them queried with postmap -q) when relay.postfix_settings is on; "
            "not relay_domains, which Postfix sends on to another host.",
            _strings,
            convert=lambda v: frozenset(str(x).strip().lower().rstrip(".") for x in v),
        ),
        "cafile": Setting(
            str, "",
            "CA bundle for MX certificates (PKIX), for the agent and for the milter's pre-flight probes. Empty: "
            "Postfix's smtp_tls_CAfile (agent), else the system trust store.",
            convert=_path_or_none,
        ),
        "helo_name": Setting(
            str, "", "Name the agent and the milter's pre-flight probes give in EHLO. Empty: Postfix's "
            "smtp_helo_name (myhostname) for the agent, this host's FQDN for the probes."
        ),
        "postfix_settings": Setting(
            bool, True,
            "Read Postfix's own settings with postconf at start and at every SIGHUP, and use them where the "
            "keys here are empty: myhostname (EHLO), smtp_bind_address(6), relayhost, "
            "sender_dependent_relayhost_maps, smtp_sasl_auth_enable with smtp_sasl_password_maps (AUTH "
            "PLAIN/LOGIN, only over a verified TLS session), smtp_tls_CAfile and smtp_tls_CApath, "
            "smtp_tls_mandatory_protocols and smtp_tls_mandatory_ciphers (only ever raising the agent's own "
            "floor, TLS 1.2), smtp_tls_exclude_ciphers and smtp_tls_mandatory_exclude_ciphers (suites removed; "
            "the mandatory list not for opt-out mail), smtp_tls_protocols and smtp_tls_ciphers (opt-out mail), "
            "smtp_connect_timeout, smtp_helo_timeout and smtp_data_done_timeout (kept within "
            "lmtp_data_done_timeout), mydestination and the virtual domain lists (relay.local_domains). The "
            "tables are queried with postmap -q for each message. The agent does not start when postconf "
            "fails. false: none of it.",
        ),
        "postfix_config_dir": Setting(
            str, "",
            "Postfix configuration directory the agent reads (postconf -c / postmap -c). Empty: Postfix's "
            "default (MAIL_CONFIG, else its compiled-in directory, /etc/postfix on Debian).",
        ),
        "postfix_command_prefix": Setting(
            list, [],
            "Words put before postconf and postmap, for a Postfix whose commands and files are not this "
            "host's own, e.g. [\"chroot\", \"/srv/postfix-root\"]. Empty: run them directly.",
            _strings,
            convert=lambda v: tuple(str(x).strip() for x in v),
        ),
        "timeout": _timeout(60.0, "Seconds for each SMTP step with an MX."),
        "spool_dir": Setting(
            str, "/var/lib/requiretls/relay-spool",
            "Directory (made 0700 at start, leftovers removed) where the agent spools the body of a message "
            "over 1 MiB while it is delivered, so that a large message is not held in memory. Each file is "
            "0600 and unlinked as soon as it is made: nothing stays after the transaction or a crash.",
        ),
        "destination_concurrency_limit": _number(
            int, 20,
            "Most deliveries the agent runs at once to one next hop or recipient domain (Postfix's "
            "default_destination_concurrency_limit); at most relay.concurrency_limit run in all.", 1000, 1,
            inclusive_low=True,
        ),
        "concurrency_limit": _number(
            int, 32,
            "Most deliveries the agent runs at once in all (each holds a thread and an SMTP connection); "
            "further LMTP deliveries from Postfix wait for a free one. Read at start only.",
            1000, 1, inclusive_low=True,
        ),
        "reinject": Setting(
            str,
            "127.0.0.1:10026",
            "Loopback IP:PORT of the re-injection smtpd (no milters, no FILTER) through which the agent "
            "hands back recipients that Postfix delivers itself (local, virtual, transport_maps, relayhost). "
            "Port: 10026 unless given.",
            convert=_endpoint(10026),
        ),
        "metrics": Setting(
            str, "",
            "Prometheus metrics address of the delivery agent, IP:PORT ([IPv6]:PORT) (docs/monitoring.md). "
            "Only a loopback "
            "address unless policyd.metrics_allow_remote = true. Empty: off.",
            convert=_endpoint(None),
        ),
        "tlsrpt_socket": Setting(
            str, "",
            "TLS-RPT (RFC 8460): the unix datagram socket of a TLSRPT collector (tlsrpt-reporter's tlsrpt-collectd, "
            "the one Postfix's smtp_tlsrpt_socket_name names), to which the agent reports each of its TLS sessions "
            "to a domain that publishes a TLSRPT record, in the format Postfix uses. Empty: off.",
            convert=_path_or_none,
        ),
        "reinject_local": Setting(
            str,
            "127.0.0.1:10027",
            "Postfix 3.7-3.10: loopback IP:PORT of the second re-injection smtpd, for REQUIRETLS recipients "
            "that local(8) delivers.  Its mail goes to a local(8) clone whose alias and .forward copies come "
            "back to the agent and keep REQUIRETLS (RFC 8689 section 4.1).  Port: 10027 unless given.",
            convert=_endpoint(10027),
        ),
    },
    "notify": {
        "delay": _number(
            (int, float), 3600.0,
            "Seconds a message must have waited because of TLS policy before its sender gets the one notice "
            "(requiretls notify) that says which recipients wait, why, and how to opt out. 0: at the first run.",
            30 * 86400, inclusive_low=True, unit=" seconds",
        ),
        "sender_domains": Setting(
            list,
            [],
            "Sender domains whose users are told (local senders; the notice then stays on this host). Empty: "
            "Postfix's mydestination, virtual_alias_domains and virtual_mailbox_domains (plain names; entries "
            "that are lookup tables are not read, list those domains here). No one else is ever told (no "
            "backscatter), except SASL-authenticated senders when notify_authenticated is true.",
            _strings,
            convert=lambda v: frozenset(str(x).strip().lower().rstrip(".") for x in v),
        ),
        "notify_authenticated": Setting(
            bool, True,
            "Also tell senders who submitted the message with SASL authentication (Postfix records the login in "
            "the queue file), whatever their domain.",
        ),
        "from": Setting(
            str, "",
            "From: of the notices (sent with the null envelope sender). Empty: MAILER-DAEMON@ Postfix's "
            "myhostname.",
        ),
        "state_dir": Setting(
            str, "/var/lib/requiretls",
            "Directory of the notifier's record of notified messages (notified.json: never twice, across "
            "restarts) and of release's journal (release.jsonl).",
        ),
        "postfix_config_dir": Setting(
            str, "", "Postfix configuration directory passed as -c to postqueue, postcat, postsuper and postconf. "
            "Empty: Postfix's default.",
        ),
        "postfix_command_prefix": Setting(
            list, [],
            "Words put before every Postfix queue command, for a Postfix in a chroot or container, e.g. "
            "[\"chroot\", \"/srv/mta\"]. Empty: run them directly.",
            _strings,
            convert=lambda v: tuple(str(x) for x in v),
        ),
    },
    "front": {
        "listen": Setting(
            list, [],
            "Where the SMTP front (requiretls front, Postfix 3.7-3.10 only) listens, e.g. [\"0.0.0.0:25\", "
            "\"[::]:25\"]: the addresses Postfix's smtpd listened on before postfix-config --front moved it to "
            "the backend address.  Empty: the front does not run.",
            _strings,
            convert=lambda v: tuple(str(x) for x in v),
        ),
        "backend": Setting(
            str, "unix:public/requiretls-front",
            "Where the front reaches the smtpd (or postscreen) behind it, which reads the PROXY protocol "
            "(postfix-config --front moves it there): unix:public/NAME, a master.cf unix service (the socket "
            "under Postfix's queue_directory, reachable only by root, Postfix and the postdrop group, which the "
            "front's unit joins; it costs less than TCP), or a loopback IP:PORT (port 10028 unless given; "
            "postscreen needs this form, it listens on TCP only).",
            convert=lambda v: Backend.parse(v, 10028),
        ),
        "hostname": Setting(str, "", "Name in the front's Received: trace field. Empty: Postfix's myhostname."),
        "tls_files": Setting(
            list, [],
            "Certificate chain and key files the front offers STARTTLS with (PEM, as smtpd_tls_chain_files). "
            "Empty: Postfix's own (smtpd_tls_chain_files, else smtpd_tls_cert_file + smtpd_tls_key_file).",
            _strings,
            convert=lambda v: tuple(str(x) for x in v),
        ),
        "auth_only": Setting(
            str, "auto",
            "Offer and accept AUTH only after STARTTLS: yes, no, or auto (Postfix's smtpd_tls_auth_only).",
            _choice("auto", "yes", "no"),
        ),
        "timeout": _timeout(300.0, "Seconds the front waits for a client or smtpd (Postfix's smtpd_timeout)."),
        "max_connections": _entries(2000, "Most client connections at once; more get 421 and retry later."),
        "workers": _number(int, 0, "Processes that share the listening sockets (TLS uses every CPU, as smtpd's "
                           "processes do). 0: one per CPU, at most 16.", 64, inclusive_low=True),
        "metrics": Setting(
            str, "",
            "Prometheus metrics address of the front, IP:PORT ([IPv6]:PORT) (docs/monitoring.md), served by its "
            "parent process for all workers. Only a loopback address unless policyd.metrics_allow_remote = true. "
            "Empty: off.",
            convert=_endpoint(None),
        ),
        "postfix_config_dir": Setting(
            str, "", "Postfix configuration directory the front reads myhostname, TLS files and smtpd_tls_auth_only "
            "from (postconf -c). Empty: Postfix's default.",
        ),
    },
    "log": {
        "target": Setting(str, "stderr", "Where daemons log: stderr (journal) or syslog (mail facility).",
                          _choice("stderr", "syslog")),
        "level": Setting(str, "info", "Least severe level logged: debug, info, warning, error.",
                         _choice("debug", "info", "warning", "error")),
    },
}


# --- one frozen settings object per section -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """``[policy]``; the tables themselves are loaded into :attr:`Settings.local_policy`."""

    table: str | None
    sender_table: str | None
    optout_from: OptoutFrom
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    requiretls_cookie: str
    optout_cookie: str
    preflight: PreflightMode


@dataclass(frozen=True, slots=True)
class DnsSettings:
    """``[dns]``; ``resolver`` None: the first nameserver of /etc/resolv.conf."""

    resolver: Endpoint | None
    timeout: float
    untrusted_resolver: str
    resolver_check_name: str = "."


@dataclass(frozen=True, slots=True)
class MtaStsSettings:
    enabled: bool
    cafile: str | None
    fetch_timeout: float
    retry_after_failure: float


@dataclass(frozen=True, slots=True)
class CacheSettings:
    backend: str
    sqlite_path: str
    redis_url: str
    max_entries: int


@dataclass(frozen=True, slots=True)
class PolicydSettings:
    listen: tuple[ListenAddress, ...]
    metrics: Endpoint | None
    metrics_allow_remote: bool
    answer_ttl: float
    lookup_timeout: float
    answer_cache_size: int
    idle_timeout: float
    answer_attributes: str


@dataclass(frozen=True, slots=True)
class RelaySettings:
    listen: ListenAddress
    relayhost: NextHop | None
    local_transports: frozenset[str]
    local_domains: frozenset[str]
    cafile: str | None
    helo_name: str
    postfix_settings: bool
    postfix_config_dir: str
    postfix_command_prefix: tuple[str, ...]
    timeout: float
    spool_dir: str
    destination_concurrency_limit: int
    concurrency_limit: int
    reinject: Endpoint
    reinject_local: Endpoint
    metrics: Endpoint | None = None
    tlsrpt_socket: str | None = None


@dataclass(frozen=True, slots=True)
class MilterSettings:
    """``[milter]``, plus what the milter needs of ``[relay]`` (copied at load time, documented with those keys):
    the relayhost, so that recipients routed there are not handed back, and the CA file and HELO name of the
    pre-flight probes."""

    socket: ListenAddress
    socket_group: str
    socket_mode: int
    timeout: int
    preflight_probe: bool
    preflight_timeout: float
    mta: str
    postfix_version: str
    relayhost: NextHop | None = None
    local_transports: frozenset[str] = frozenset()
    probe_cafile: str | None = None
    probe_helo_name: str = ""
    metrics: Endpoint | None = None
    optout_audit: bool = False


@dataclass(frozen=True, slots=True)
class NotifySettings:
    """``[notify]``: the opt-out loop (``requiretls queue``, ``notify``, ``release``)."""

    delay: float = 3600.0
    sender_domains: frozenset[str] = frozenset()
    notify_authenticated: bool = True
    from_: str = ""
    state_dir: str = "/var/lib/requiretls"
    postfix_config_dir: str = ""
    postfix_command_prefix: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FrontConfig:
    """``[front]``: the optional SMTP front (``requiretls front``)."""

    listen: tuple[str, ...] = ()
    backend: Backend | None = None
    hostname: str = ""
    tls_files: tuple[str, ...] = ()
    auth_only: str = "auto"
    timeout: float = 300.0
    max_connections: int = 2000
    workers: int = 0
    metrics: Endpoint | None = None
    postfix_config_dir: str = ""


@dataclass(frozen=True, slots=True)
class LogSettings:
    target: str
    level: str


@dataclass(frozen=True, slots=True)
class Settings:
    """The loaded configuration: one typed object per section, the loaded policy tables, and the warnings
    (old syntax still accepted) with file, line and key."""

    filename: str
    policy: PolicySettings
    dns: DnsSettings
    mta_sts: MtaStsSettings
    cache: CacheSettings
    policyd: PolicydSettings
    milter: MilterSettings
    relay: RelaySettings
    log: LogSettings
    local_policy: LocalPolicy
    warnings: tuple[str, ...] = field(default=())
    notify: NotifySettings = field(default_factory=NotifySettings)
    front: FrontConfig = field(default_factory=FrontConfig)


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


@dataclass(frozen=True, slots=True)
class _Parsed:
    values: dict[str, dict[str, Any]]
    typed: dict[str, dict[str, Any]]
    warnings: tuple[str, ...]
    where: dict[tuple[str, ...], int]


def _parse(text: str, filename: str) -> _Parsed:
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
    typed: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for section, keys in SCHEMA.items():
        typed[section] = {}
        for key, spec in keys.items():
            value = values[section][key]
            line = where.get((section, key))
            try:
                typed[section][key] = spec.convert(value) if spec.convert else value
            except ValueError as e:
                raise ConfigError(filename, line, f"{section}.{key}", str(e)) from None
            got = typed[section][key]
            pairs = zip(value, got, strict=True) if isinstance(got, tuple) else [(value, got)]
            warnings.extend(str(ConfigError(filename, line, f"{section}.{key}",
                                            f"{raw!r} is an old form; write {str(item)!r}"))
                            for raw, item in pairs if isinstance(item, ListenAddress) and item.legacy)
    for section in ("policyd", "milter", "relay", "front"):
        metrics = typed[section]["metrics"]
        if metrics is not None and not metrics.loopback and not typed["policyd"]["metrics_allow_remote"]:
            raise ConfigError(filename, where.get((section, "metrics")), f"{section}.metrics",
                              f"{values[section]['metrics']!r} is not a loopback address; the metrics endpoint has "
                              "no authentication: set policyd.metrics_allow_remote = true to serve it there anyway")
    return _Parsed(values, typed, tuple(warnings), where)


def parse(text: str, filename: str) -> dict[str, dict[str, Any]]:
    """Parse and validate TOML text against :data:`SCHEMA`; the result has every key of every section, as
    written in TOML (the typed values are :func:`load`'s)."""
    return _parse(text, filename).values


def _read(path: str, purpose: str, filename: str, line: int | None, key: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(filename, line, key, f"cannot read {purpose} {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, None, f"not UTF-8 text: {e.reason}") from e


def _table_path(path: str, filename: str) -> str | None:
    if not path:
        return None
    base = os.path.dirname(os.path.abspath(filename)) if filename else os.getcwd()
    return os.path.join(base, path)


def build_local_policy(values: Mapping[str, Mapping[str, Any]], filename: str, text: str = "") -> LocalPolicy:
    """Load the tables named in ``[policy]`` (paths relative to the config file) and build the policy."""
    p = values["policy"]
    where = _key_lines(text)
    tables: dict[str, PolicyTable] = {}
    for key, kind in (("table", "destination"), ("sender_table", "sender")):
        full = _table_path(p[key], filename)
        if full is None:
            tables[key] = PolicyTable.empty(kind)  # type: ignore[arg-type]
            continue
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


def _settings(parsed: _Parsed, filename: str, local_policy: LocalPolicy) -> Settings:
    t = parsed.typed
    policy = dict(t["policy"], table=_table_path(t["policy"]["table"], filename),
                  sender_table=_table_path(t["policy"]["sender_table"], filename))
    relay = RelaySettings(**t["relay"])
    milter = MilterSettings(**t["milter"], relayhost=relay.relayhost, local_transports=relay.local_transports,
                            probe_cafile=relay.cafile,
                            probe_helo_name=relay.helo_name)
    return Settings(
        filename, PolicySettings(**policy), DnsSettings(**t["dns"]), MtaStsSettings(**t["mta_sts"]),
        CacheSettings(**t["cache"]), PolicydSettings(**t["policyd"]), milter, relay, LogSettings(**t["log"]),
        local_policy, parsed.warnings,
        NotifySettings(**{("from_" if k == "from" else k): v for k, v in t["notify"].items()}),
        FrontConfig(**t["front"]),
    )


def load(filename: str | None) -> Settings:
    """Load a config file, or the built-in defaults when ``filename`` is None.  Warnings (old syntax that is
    still accepted) are logged and kept in :attr:`Settings.warnings`."""
    if filename is None:
        parsed = _parse("", "<defaults>")
        return _settings(parsed, "", build_local_policy(parsed.values, ""))
    text = _read(filename, "config file", filename, None, "")
    parsed = _parse(text, filename)
    settings = _settings(parsed, filename, build_local_policy(parsed.values, filename, text))
    for warning in settings.warnings:
        log.warning("%s", warning)
    return settings


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
