"""Destination facts + local table + zone -> the answer for a Postfix TLS policy lookup (socketmap).

One daemon serves several transports; the socketmap *name* selects the zone:

* ``default``: the destination's normal policy (table, else DANE, else MTA-STS enforce, else NOTFOUND);
* ``relaxed``: opt-out messages: ``may``, except ``optout=no`` destinations, which get their ``default`` answer;
* ``strict``: REQUIRETLS through Postfix 3.11's own smtp client: an authenticated level where RFC 8689 allows
  the MX, ``encrypt`` (which 3.11 refuses for REQUIRETLS with 5.7.10) where it does not, TEMP on doubt;
* ``requiretls``: Postfix 3.11 ``smtp_requiretls_policy``: ``enforce`` unless the table says ``requiretls=no``.

A map name with :data:`TLSRPT_SUFFIX` (``default+tlsrpt``, written by ``postfix-config`` for Postfix 3.10+)
asks for MTA-STS answers with Postfix's TLSRPT policy attributes; the bare name gets plain answers, which
every Postfix version reads.  MTA-STS ``mx`` patterns are enforced exactly in both forms (RFC 8461 section 4.1).

Answers use exact Postfix syntax; ``optout=`` and ``requiretls=`` never reach Postfix.  Trouble is TEMP
(Postfix defers), never a weaker level.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from requiretls.facts import Destination, TlsRequirement, name_matches
from requiretls.policy.eligibility import Outcome, judge, mx_validated
from requiretls.policy.table import PolicyTable, TableEntry


class Zone(enum.StrEnum):
    DEFAULT = "default"
    RELAXED = "relaxed"
    STRICT = "strict"
    REQUIRETLS = "requiretls"


#: Map-name suffix asking for Postfix 3.10+'s TLSRPT attributes in MTA-STS answers.
TLSRPT_SUFFIX = "+tlsrpt"


class Status(enum.StrEnum):
    """socketmap_table(5) reply status words."""

    OK = "OK"
    NOTFOUND = "NOTFOUND"
    TEMP = "TEMP"
    PERM = "PERM"


@dataclass(frozen=True, slots=True)
class Answer:
    status: Status
    data: str = ""

    def wire(self) -> str:
        """The reply text, without netstring framing."""
        return f"{self.status} {self.data}" if self.data or self.status is not Status.NOTFOUND else "NOTFOUND "


#: Levels that authenticate the server (RFC 8689 §4.2.1 step 4; Postfix REQUIRETLS_README "enforce").
AUTHENTICATED_LEVELS = frozenset({"dane-only", "fingerprint", "verify", "secure"})
_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_DOMAIN_KEY = re.compile(rf"\.?{_LABEL}(?:\.{_LABEL})*\.?")
_NEXTHOP_KEY = re.compile(r"\[[0-9a-z_.:-]{1,255}\](?::\d{1,5})?|[0-9a-z_.-]{1,255}:\d{1,5}")
MAX_KEY = 300
#: Longest domain name in text form, without the final dot (RFC 1035 §2.3.4: 255 octets on the wire).
MAX_DOMAIN = 253


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed lookup key: ``domain`` for MX-style next hops, None for ``[host]`` / ``host:port`` forms."""

    key: str
    domain: str | None
    parent: bool


def parse_key(raw: str) -> Query | Answer:
    """Validate a lookup key; a bad one gets PERM (a malformed request is a client bug, not trouble)."""
    if not raw or len(raw) > MAX_KEY or not raw.isascii() or not raw.isprintable() or " " in raw:
        return Answer(Status.PERM, "invalid lookup key")
    key = raw.lower()
    if _NEXTHOP_KEY.fullmatch(key):
        return Query(key, None, False)
    if _DOMAIN_KEY.fullmatch(key):
        domain = key.strip(".")
        if len(domain) > MAX_DOMAIN:
            # No DNS name is that long (RFC 1035 §2.3.4): a lookup could only fail, and TEMP would defer the
            # mail until it expires.  PERM says at once that the key is wrong (issue 17).
            return Answer(Status.PERM, f"invalid lookup key: domain longer than {MAX_DOMAIN} characters")
        if _is_ip(domain):
            # A bare address is no domain with MX records; Postfix writes an address next hop as [address].
            return Answer(Status.PERM, "invalid lookup key: IP address without brackets")
        return Query(key, domain, key.startswith("."))
    return Answer(Status.PERM, "invalid lookup key")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def needs_destination(zone: Zone, query: Query, table: PolicyTable) -> bool:
    """Whether answering takes a DNS/MTA-STS lookup (the daemon then calls :func:`answer` with it)."""
    if query.domain is None or query.parent or zone is Zone.REQUIRETLS:
        return False
    entry = table.lookup_domain(query.domain)
    if zone is Zone.RELAXED:
        return entry is not None and entry.optout is False and entry.level is None
    if zone is Zone.STRICT:
        return entry is None or entry.level not in AUTHENTICATED_LEVELS
    return entry is None or entry.level is None


def _sts_names(dest: Destination) -> tuple[str, ...]:
    """The certificate names an MTA-STS ``enforce`` policy allows, as literal host names Postfix matches
    exactly: each exact ``mx`` pattern as published, and each ``*.`` pattern expanded to the destination's
    current MX hosts it matches (RFC 8461 section 4.1: the wildcard is one whole label).

    Postfix's ``.domain`` form would also accept ``a.b.domain`` (a name two labels below ``*.domain``), so a
    wildcard is never passed on as such: an MX the policy does not allow finds its certificate refused (its
    name is not in the list) and Postfix tries the next MX or defers.  Where no current MX matches a pattern
    there is nothing to list, and the caller answers TEMP."""
    if dest.sts is None or dest.sts.policy is None:
        return ()
    names: list[str] = []
    for pattern in (p.lower().rstrip(".") for p in dest.sts.policy.mx):
        if pattern.startswith("*."):
            names += [h.name.lower().rstrip(".") for h in dest.hosts if name_matches(pattern, h.name)]
        elif pattern:
            names.append(pattern)
    return tuple(dict.fromkeys(names))


def _tlsrpt_attributes(dest: Destination) -> str:
    """Postfix >= 3.10's STS policy attributes (TLSRPT_README "MTA-STS Support via smtp_tls_policy_maps"):
    with them Postfix reports the policy in its TLSRPT summaries, and 3.10.5+ with
    ``smtp_tls_enforce_sts_mx_patterns = yes`` (its default) connects only to MX hosts the patterns allow
    and matches each certificate against the MX host name.  Postfix < 3.10 refuses the whole answer
    ("invalid attribute name"), hence the plain answers for those versions."""
    pol = dest.sts.policy if dest.sts is not None else None
    if pol is None:
        return ""
    patterns = [p.lower().rstrip(".") for p in pol.mx]
    lines = ["version: STSv1", f"mode: {pol.mode.value}", *(f"mx: {p}" for p in patterns), f"max_age: {pol.max_age}"]
    return " ".join([
        "policy_type=sts", f"policy_domain={dest.domain.lower().rstrip('.')}",
        *(f"mx_host_pattern={p}" for p in patterns),
        *(f"{{ policy_string = {line} }}" for line in lines),
    ])


def _sts_secure(dest: Destination, attributes: bool) -> Answer:
    """``secure`` for an MTA-STS ``enforce`` destination, its MX patterns enforced exactly; TEMP (defer) when
    no current MX may be used under the policy."""
    names = _sts_names(dest)
    if not names:
        return Answer(Status.TEMP, "no MX host matches the MTA-STS policy's mx patterns")
    data = f"secure match={':'.join(names)} servername=hostname"
    if attributes:
        data += " " + _tlsrpt_attributes(dest)
    return Answer(Status.OK, data)


def _dane(dest: Destination) -> str:
    usable = [h for h in dest.hosts if h.usable]
    # dane-only when every MX has usable TLSA; otherwise Postfix's per-MX 'dane' (RFC 7672 §2.2).
    return "dane-only" if usable and all(h.usable_tlsa for h in usable) else "dane"


def _from_destination(dest: Destination, attributes: bool = False) -> Answer:
    req = dest.requirement
    if req is TlsRequirement.DEFER:
        return Answer(Status.TEMP, dest.reason[:200])
    if req is TlsRequirement.DANE:
        return Answer(Status.OK, _dane(dest))
    if req is TlsRequirement.STS_ENFORCE:
        if dest.sts is None or dest.sts.policy is None or not dest.sts.policy.mx:
            return Answer(Status.TEMP, "MTA-STS enforce policy without mx patterns")
        return _sts_secure(dest, attributes)
    return Answer(Status.NOTFOUND)


def _table(entry: TableEntry | None) -> Answer | None:
    if entry is None or entry.postfix_policy() is None:
        return None
    return Answer(Status.OK, entry.postfix_policy() or "")


def answer(zone: Zone, query: Query, table: PolicyTable, dest: Destination | None = None,
           error: str | None = None, attributes: bool = False) -> Answer:
    """The reply for one lookup.  ``dest`` is the lookup result when :func:`needs_destination` said so;
    ``error`` says that lookup failed (then the answer is TEMP wherever the destination mattered).
    ``attributes``: add Postfix 3.10+'s TLSRPT policy attributes to MTA-STS answers (never for Postfix < 3.10,
    which refuses them)."""
    def from_dest(d: Destination) -> Answer:
        return _from_destination(d, attributes)

    entry = table.lookup_nexthop(query.key) if query.domain is None else (
        None if query.parent else table.lookup_domain(query.domain)
    )
    if query.parent:
        # The exact key was answered already (table parents included); Postfix asks .parent only after NOTFOUND.
        return Answer(Status.NOTFOUND)
    if zone is Zone.REQUIRETLS:
        if entry is not None and entry.requiretls is False:
            return Answer(Status.OK, "opportunistic")
        return Answer(Status.OK, "enforce")
    if zone is Zone.RELAXED:
        if entry is None or entry.optout is not False:
            return Answer(Status.OK, "may")
        return _table(entry) or _need(dest, error, from_dest)
    if zone is Zone.STRICT:
        if entry is not None and entry.level in AUTHENTICATED_LEVELS:
            return _table(entry) or Answer(Status.TEMP, "table")
        if query.domain is None:
            return Answer(Status.OK, "secure")
        return _need(dest, error, lambda d: _strict(d, attributes))
    if query.domain is None:
        return _table(entry) or Answer(Status.NOTFOUND)
    return _table(entry) or _need(dest, error, from_dest)


def _need(dest: Destination | None, error: str | None, f: Callable[[Destination], Answer]) -> Answer:
    if error is not None or dest is None:
        return Answer(Status.TEMP, (error or "destination lookup missing")[:200])
    return f(dest)


def _strict(dest: Destination, attributes: bool = False) -> Answer:
    """REQUIRETLS through Postfix 3.11's smtp client (the strict clone): the eligibility verdict (RFC 8689
    section 4.2.1 steps 1-2), then an authenticated level for its first candidate MX.

    Doubt (DNS, MTA-STS fetch) is TEMP.  A verdict that bounces (no MX validated by DNSSEC or an MTA-STS
    ``enforce`` policy) is ``encrypt``: a socketmap cannot bounce, and TEMP would hold the message for days,
    whereas 3.11 refuses an unauthenticated level for REQUIRETLS at once with 5.7.10 (RFC 8689 section 5).
    ``encrypt`` never sends in clear, even for a destination the table exempts (``requiretls=no``)."""
    verdict = judge(dest)
    if verdict.outcome is Outcome.BOUNCE:
        return Answer(Status.OK, "encrypt")
    if verdict.outcome is not Outcome.DELIVER:
        return Answer(Status.TEMP, f"{verdict.dsn} {verdict.reason}"[:200])
    if dest.requirement is TlsRequirement.DANE:
        return Answer(Status.OK, "dane-only")
    first = next(h for h in dest.hosts if h.name == verdict.mx)
    if not first.mx_secure and mx_validated(dest, first) and _sts_names(dest):
        return _sts_secure(dest, attributes)
    # RFC 8689 section 4.2.1: a DNSSEC-validated MX name with a PKIX certificate for that name also qualifies.
    return Answer(Status.OK, "secure match=hostname")
