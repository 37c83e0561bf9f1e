"""Where a classified message goes: the value of the private route header for a given Postfix.

Postfix cannot pick a TLS policy per message, so a message is steered by *where it is delivered*: the milter
adds ``X-RequireTLS-Route: VALUE`` and the generated ``milter_header_checks`` turns VALUE into a FILTER
(architecture, "How each Postfix version is driven").  FILTER applies to every recipient of the message and
bypasses transport_maps, relayhost and local delivery, which decides between the values below.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from requiretls.policy.headers import HANDBACK_HEADER, ROUTE_HEADER, format_handback
from requiretls.policy.model import Decision, HeaderEdit, MessageClass
from requiretls.policy.table import split_address


class Route(enum.StrEnum):
    #: REQUIRETLS: to the delivery agent (LMTP), which hands back what Postfix must deliver itself.
    RELAY = "relay"
    #: Opt-out with recipients Postfix routes itself (local, transport_maps, relayhost): to the agent, which
    #: delivers the rest opportunistically.
    RELAY_OPTOUT = "relay-optout"
    #: Postfix >= 3.11, REQUIRETLS tagged by a local rule: the agent re-injects the message with
    #: ``Require-TLS-ESMTP: yes`` so that Postfix's native REQUIRETLS enforces it.
    REINJECT = "reinject"
    #: To the relaxed smtp transport clone (opportunistic TLS, ``optout=no`` destinations keep their policy).
    RELAXED = "relaxed"


#: Postfix delivery agents that send to a recipient domain's MX themselves.
_SMTP_MAILERS = frozenset({"smtp", "relay"})
_VERSION = re.compile(r"(\d+)\.(\d+)")


@dataclass(frozen=True, slots=True)
class RcptRoute:
    """What Postfix's resolver said of one recipient: milter macros ``{rcpt_mailer}`` and ``{rcpt_host}``."""

    address: str
    mailer: str | None = None
    host: str | None = None


@dataclass(frozen=True, slots=True)
class PostfixFeatures:
    """What the running MTA does natively.  ``postfix=False``: another MTA (Sendmail), which has neither the
    route-header FILTER nor a way to enforce REQUIRETLS on delivery."""

    version: tuple[int, int] = (3, 7)
    postfix: bool = True

    @classmethod
    def from_macro(cls, text: str | None) -> PostfixFeatures:
        """From the milter ``v`` macro (``Postfix 3.11.7``; Sendmail sends its bare version, ``8.17.1.9``) or
        ``postconf -h mail_version``; unknown -> Postfix 3.7, which needs the plugin for everything (safe: it
        never relies on a native feature)."""
        t = (text or "").strip()
        m = _VERSION.search(t)
        if t and not t.lower().startswith("postfix") and not re.fullmatch(r"[3-7]\.\d+(\.\d+)?", t):
            return cls((int(m.group(1)), int(m.group(2))) if m else (0, 0), postfix=False)
        return cls((int(m.group(1)), int(m.group(2)))) if m else cls()

    @classmethod
    def configured(cls, mta: str = "auto", postfix_version: str = "", macro: str | None = None) -> PostfixFeatures:
        """The MTA as the ``milter.mta`` and ``milter.postfix_version`` settings describe it, else from the
        ``v`` macro: ``sendmail`` has no FILTER and enforces nothing; a set version wins over the macro."""
        if mta == "sendmail":
            return cls((0, 0), postfix=False)
        if postfix_version:
            return cls.from_macro(f"Postfix {postfix_version}")
        return cls.from_macro(macro)

    @property
    def native_requiretls(self) -> bool:
        """Postfix 3.11 receives MAIL FROM REQUIRETLS and enforces it on delivery."""
        return self.postfix and self.version >= (3, 11)

    @property
    def native_tls_required(self) -> bool:
        """Postfix 3.10 honours a received ``TLS-Required: No``."""
        return self.postfix and self.version >= (3, 10)


def _goes_to_mx(r: RcptRoute) -> bool:
    """True when Postfix would send this recipient over SMTP to its own domain's MX: then a FILTER to an smtp
    transport with an empty next hop (which uses the recipient domain) sends it to the same place."""
    if r.mailer is None:
        return False
    if r.mailer.lower() not in _SMTP_MAILERS:
        return False
    domain = split_address(r.address)[1]
    return r.host is None or r.host.lower().rstrip(".") == domain


def plan_route(decision: Decision, rcpts: Sequence[RcptRoute], postfix: PostfixFeatures, native: bool) -> Route | None:
    """The route header value for this message, or None for Postfix's normal delivery.

    ``native`` says the REQUIRETLS tag came in a form Postfix 3.11 carries itself (the MAIL FROM parameter or a
    received ``Require-TLS-ESMTP: yes``).
    """
    if not postfix.postfix:
        return None
    if decision.msg_class is MessageClass.REQUIRETLS:
        if postfix.native_requiretls:
            return None if native else Route.REINJECT
        return Route.RELAY
    if decision.msg_class is MessageClass.OPTOUT:
        # The relaxed clone sends each recipient to its domain's MX; anything Postfix would route elsewhere
        # (local, virtual, transport_maps, relayhost) goes to the agent, which hands it back to Postfix.
        if rcpts and all(_goes_to_mx(r) for r in rcpts):
            return Route.RELAXED
        return Route.RELAY_OPTOUT
    return None


def _hop(nexthop: str) -> str:
    """A next hop in one form for comparing: ``[Host]:25`` and ``host`` are the same hop."""
    h = nexthop.strip().lower()
    if h.endswith(":25"):
        h = h[:-3]
    return h.strip("[]").rstrip(".")


def handback(rcpts: Sequence[RcptRoute], relayhost: str = "") -> tuple[str, ...]:
    """Recipients the agent must give back to Postfix (it would not send them to their domain's MX itself):
    local/virtual/pipe delivery and transport_maps routes.  The relayhost is not among them: the agent sends
    REQUIRETLS mail to it under the same rules as to an MX."""
    out = []
    for r in rcpts:
        if _goes_to_mx(r):
            continue
        if relayhost and r.mailer and r.mailer.lower() in _SMTP_MAILERS and _hop(r.host or "") == _hop(relayhost):
            continue
        out.append(r.address)
    return tuple(out)


#: Routes that end at the delivery agent, which reads the hand-back list.
AGENT_ROUTES = frozenset({Route.RELAY, Route.RELAY_OPTOUT, Route.REINJECT})


def route_edits(route: Route | None, handback_rcpts: Sequence[str] = ()) -> tuple[HeaderEdit, ...]:
    """The header fields that carry the route (and, for the agent, the hand-back list)."""
    if route is None:
        return ()
    if handback_rcpts and route in AGENT_ROUTES:
        return (HeaderEdit("add", ROUTE_HEADER, str(route)),
                HeaderEdit("add", HANDBACK_HEADER, format_handback(handback_rcpts)))
    return (HeaderEdit("add", ROUTE_HEADER, str(route)),)


def with_route(decision: Decision, route: Route | None, handback_rcpts: Sequence[str] = ()) -> Decision:
    """The decision with the route header (and, for the agent, the hand-back list) added to its edits."""
    if route is None:
        return decision
    return replace(decision, header_edits=decision.header_edits + route_edits(route, handback_rcpts))
