"""The local policy tables: Postfix ``smtp_tls_policy_maps`` syntax plus our own attributes.

Destination table (keyed by recipient domain or next hop)::

    example.com     dane        optout=yes
    example.net     dane-only   optout=no   protocols=>=TLSv1.3
    .gov.example    secure      requiretls=yes
    partner.example optout=no

Sender table (keyed like Postfix's check_sender_access: ``user@domain``, ``domain``, ``.parent``, ``user@``,
``<>`` for the null sender)::

    ceo@example.com     requiretls=yes
    @lists.example.com  optout=no

The Postfix part (level and Postfix attributes) is what the policy service sends to Postfix; ``optout=`` and
``requiretls=`` are ours and never reach Postfix.  Parsing is pure: text in, entries out; every error names
file, line and key.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from requiretls.errors import ConfigError

#: TLS security levels of smtp_tls_policy_maps (postconf(5)).
LEVELS = frozenset({"none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify", "secure"})
#: Postfix attributes and the levels that accept them (smtp_tls_policy.c tls_policy_lookup_one()).
_TLS_LEVELS = LEVELS - {"none"}
POSTFIX_ATTRS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "ciphers": _TLS_LEVELS,
        "exclude": _TLS_LEVELS,
        "protocols": _TLS_LEVELS,
        "connection_reuse": _TLS_LEVELS,
        "servername": _TLS_LEVELS,
        "enable_rpk": _TLS_LEVELS,
        "match": frozenset({"fingerprint", "verify", "secure"}),
        "tafile": frozenset({"verify", "secure"}),
    }
)
OUR_ATTRS = frozenset({"optout", "requiretls"})
#: TLS protocol names Postfix knows (tls_misc.c protocol_table), for ``protocols=`` lists and ``!`` exclusions.
PROTOCOLS: tuple[str, ...] = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
#: Names allowed in ``>=`` / ``<=`` bounds (tls_misc.c tls_version_table: no SSLv2 there).
PROTOCOL_BOUNDS: tuple[str, ...] = PROTOCOLS[1:]
#: Cipher grades of the ``ciphers=`` attribute (tls_misc.c tls_cipher_grade_table; low/export mean medium now).
CIPHER_GRADES = frozenset({"high", "medium", "low", "export", "null"})
#: Attributes Postfix refuses when given twice in one policy (smtp_tls_policy.c tls_policy_lookup_one()).
_ONCE = frozenset({"ciphers", "protocols", "servername", "exclude"})
_BOOL = {"yes": True, "no": False}
_DOMAIN = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NEXTHOP = re.compile(r"\[[^\[\]\s]+\](?::\d{1,5})?|[^\[\]\s:]+:\d{1,5}")

TableKind = Literal["destination", "sender"]


@dataclass(frozen=True, slots=True)
class TableEntry:
    """One logical line of a table."""

    key: str
    level: str | None
    attrs: tuple[tuple[str, str], ...]
    optout: bool | None
    requiretls: bool | None
    filename: str
    line: int

    def postfix_policy(self) -> str | None:
        """The answer for Postfix (level and its attributes), or None when the entry only carries our rules."""
        if self.level is None:
            return None
        return " ".join([self.level, *(f"{k}={v}" for k, v in self.attrs)])


def normalize_domain(domain: str) -> str:
    """Lower-case, without a trailing dot; IDNs in their A-label form where possible (as DNS and Postfix)."""
    d = domain.strip().rstrip(".").lower()
    if not d.isascii():
        with contextlib.suppress(UnicodeError):
            d = d.encode("idna").decode("ascii")
    return d


def split_address(address: str) -> tuple[str, str]:
    """``(localpart, domain)``; the domain is normalised, a missing one is ``""``."""
    addr = address.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    local, sep, domain = addr.rpartition("@")
    if not sep:
        return addr, ""
    return local, normalize_domain(domain)


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Postfix table lines: ``#`` comments and blank lines are skipped, a line starting with white space
    continues the previous one (postmap(1))."""
    start, buf = 0, ""
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[:1] in (" ", "\t"):
            if buf:
                buf += " " + stripped
                continue
            yield n, stripped  # a continuation with nothing to continue: let the key check complain
            continue
        if buf:
            yield start, buf
        start, buf = n, stripped
    if buf:
        yield start, buf


def _domain_key(k: str) -> str | None:
    """A ``domain`` or ``.parent`` key in normal form, or None when it is neither."""
    dot = "." if k.startswith(".") else ""
    d = normalize_domain(k[len(dot) :])
    return dot + d if _DOMAIN.fullmatch(d) else None


def _check_key(key: str, kind: TableKind, filename: str, line: int) -> str:
    k = key.lower()
    if kind == "destination":
        if _NEXTHOP.fullmatch(k):
            return k
        dk = _domain_key(k)
        if dk is not None:
            return dk
        raise ConfigError(filename, line, key, "not a domain, .parent domain or [host]:port next hop")
    if k == "<>":
        return k
    if "@" in k:
        local, _, domain = k.rpartition("@")
        if not domain and local:
            return k  # user@
        d = normalize_domain(domain)
        if domain and _DOMAIN.fullmatch(d):
            return f"{local}@{d}"
    else:
        dk = _domain_key(k)
        if dk is not None:
            return dk
    raise ConfigError(filename, line, key, "not an address, @domain, domain, .parent domain, user@ or <>")


def protocols_problem(value: str) -> str | None:
    """Why Postfix would not understand a ``protocols=`` value (smtp_tls_protocols syntax, postconf(5)), or None.

    Items are separated by colons, commas or spaces (inside a policy table only colons survive the attribute
    split); each is a protocol name to include, ``!NAME`` to exclude, or ``>=NAME`` / ``<=NAME`` to bound the
    version.  Names are case-insensitive, as in Postfix.  Hexadecimal bounds (``>=0x0303``), which Postfix also
    reads, are refused here: write the name."""
    items = [t for t in re.split(r"[\s,:]+", value) if t]
    if not items:
        return "empty protocol list"
    known = {p.lower(): p for p in PROTOCOLS}
    for item in items:
        if item.startswith((">=", "<=")):
            name, allowed = item[2:], PROTOCOL_BOUNDS
        else:
            name, allowed = item.removeprefix("!"), PROTOCOLS
        if known.get(name.lower()) not in allowed:
            return f"unknown TLS protocol {name!r} in {item!r}; known: {', '.join(allowed)}"
    return None


def _hostname_ok(name: str) -> bool:
    return len(name) <= 253 and _DOMAIN.fullmatch(name.lower().rstrip(".")) is not None


def _attr_problem(name: str, val: str) -> str | None:
    """Why Postfix would refuse or misread this attribute value (smtp_tls_policy.c), or None."""
    if name == "protocols":
        return protocols_problem(val)
    if name == "ciphers" and val.lower() not in CIPHER_GRADES:
        return f"unknown cipher grade {val!r}; one of {', '.join(sorted(CIPHER_GRADES))}"
    if name in ("connection_reuse", "enable_rpk") and val.lower() not in _BOOL:
        return f"must be yes or no, not {val!r}"
    if name == "servername" and not _hostname_ok(val):
        return f"not a host name: {val!r}"
    return None


def parse_entry(key_text: str, value: str, kind: TableKind, filename: str, line: int) -> TableEntry:
    key = _check_key(key_text, kind, filename, line)
    tokens = [t for t in re.split(r"[\s,]+", value) if t]
    if not tokens:
        raise ConfigError(filename, line, key, "no value: give a TLS level and/or attributes")
    level: str | None = None
    if "=" not in tokens[0]:
        level = tokens.pop(0).lower()
        if kind == "sender":
            raise ConfigError(filename, line, key, f"sender rules take only optout= and requiretls=, not {level!r}")
        if level not in LEVELS:
            raise ConfigError(filename, line, key, f"unknown TLS security level {level!r}")
    attrs: list[tuple[str, str]] = []
    ours: dict[str, bool] = {}
    for tok in tokens:
        name, eq, val = tok.partition("=")
        name = name.lower()
        if not eq or not name:
            raise ConfigError(filename, line, key, f"expected name=value, got {tok!r}")
        if name in OUR_ATTRS:
            if val.lower() not in _BOOL:
                raise ConfigError(filename, line, f"{key}: {name}", f"must be yes or no, not {val!r}")
            if name in ours:
                raise ConfigError(filename, line, f"{key}: {name}", "given twice")
            ours[name] = _BOOL[val.lower()]
            continue
        if kind == "sender" or name not in POSTFIX_ATTRS:
            raise ConfigError(filename, line, f"{key}: {name}", "unknown attribute")
        if level is None:
            raise ConfigError(filename, line, f"{key}: {name}", "a Postfix attribute needs a TLS level first")
        if level not in POSTFIX_ATTRS[name]:
            raise ConfigError(filename, line, f"{key}: {name}", f"not valid with level {level!r}")
        if not val:
            raise ConfigError(filename, line, f"{key}: {name}", "empty value")
        if name in _ONCE and any(n == name for n, _ in attrs):
            raise ConfigError(filename, line, f"{key}: {name}", "given twice (Postfix refuses the policy)")
        problem = _attr_problem(name, val)
        if problem:
            raise ConfigError(filename, line, f"{key}: {name}", problem)
        attrs.append((name, val))
    return TableEntry(key, level, tuple(attrs), ours.get("optout"), ours.get("requiretls"), filename, line)


class PolicyTable:
    """A parsed table with Postfix's lookup order."""

    def __init__(self, entries: Mapping[str, TableEntry], kind: TableKind) -> None:
        self._entries = dict(entries)
        self.kind: TableKind = kind

    @classmethod
    def parse(cls, text: str, filename: str, kind: TableKind = "destination") -> PolicyTable:
        entries: dict[str, TableEntry] = {}
        for line, logical in _logical_lines(text):
            key_text, _, value = logical.partition(" ")
            if "\t" in key_text:
                key_text, _, rest = key_text.partition("\t")
                value = rest + " " + value
            entry = parse_entry(key_text, value.strip(), kind, filename, line)
            if entry.key in entries:
                first = entries[entry.key].line
                raise ConfigError(filename, line, entry.key, f"duplicate entry (first at line {first})")
            entries[entry.key] = entry
        return cls(entries, kind)

    @classmethod
    def empty(cls, kind: TableKind = "destination") -> PolicyTable:
        return cls({}, kind)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[TableEntry]:
        return iter(self._entries.values())

    def lookup_domain(self, domain: str) -> TableEntry | None:
        """Exact domain, then ``.parent`` keys from the nearest parent up (smtp_tls_policy_maps order)."""
        d = normalize_domain(domain)
        if not d:
            return None
        hit = self._entries.get(d)
        if hit is not None:
            return hit
        labels = d.split(".")
        for i in range(1, len(labels)):
            hit = self._entries.get("." + ".".join(labels[i:]))
            if hit is not None:
                return hit
        return None

    def lookup_nexthop(self, nexthop: str) -> TableEntry | None:
        """A Postfix next hop (``domain``, ``[host]``, ``[host]:port``): the verbatim key first, then domains."""
        hit = self._entries.get(nexthop.lower())
        if hit is not None or nexthop.startswith("["):
            return hit
        return self.lookup_domain(nexthop.rsplit(":", 1)[0] if re.search(r":\d+$", nexthop) else nexthop)

    def lookup_sender(self, address: str) -> TableEntry | None:
        """``<>`` for the null sender; else ``user@domain``, ``@domain``, ``domain``, ``.parent``..., ``user@``."""
        if address.strip("<> ") == "":
            return self._entries.get("<>")
        local, domain = split_address(address)
        local = local.lower()
        for key in (f"{local}@{domain}", f"@{domain}"):
            hit = self._entries.get(key)
            if hit is not None:
                return hit
        hit = self.lookup_domain(domain) if domain else None
        if hit is not None:
            return hit
        return self._entries.get(f"{local}@")
