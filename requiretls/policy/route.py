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

from requiretls.addresses import NextHop
from requiretls.policy.headers import HANDBACK_HEADER, NEXTHOP_HEADER, ROUTE_HEADER, format_handback, format_nexthops
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
    #: Postfix >= 3.11, REQUIRETLS that Postfix enforces natively, every recipient to its domain's MX: to the
    #: strict smtp clone, whose TLS policy (the policy service's ``strict`` zone) authenticates every MX RFC 8689
    #: allows, a DNSSEC-validated MX with a PKIX certificate and no TLSA included (the ``default`` zone leaves
    #: that one at ``may``, which 3.11 refuses for REQUIRETLS with 5.7.10).
    STRICT = "strict"


#: Separates the next hops of a list (Postfix 3.5+ ``relayhost = [a], [b]``) in the next-hop header value.
NEXTHOP_LIST_SEP = "|"
MAX_NEXTHOPS = 8
_LIST_SEP = re.compile(r"[\s,]+")

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
            if not native:
                return Route.REINJECT
            # FILTER covers every recipient: only when all of them go to their own MX anyway.
            return Route.STRICT if rcpts and all(_goes_to_mx(r) for r in rcpts) else None
        return Route.RELAY
    if decision.msg_class is MessageClass.OPTOUT:
        # The relaxed clone sends each recipient to its domain's MX; anything Postfix would route elsewhere
        # (local, virtual, transport_maps, relayhost) goes to the agent, which hands it back to Postfix.
        if rcpts and all(_goes_to_mx(r) for r in rcpts):
            return Route.RELAXED
        return Route.RELAY_OPTOUT
    return None


class Leg(enum.StrEnum):
    """How one recipient of a message routed to the agent leaves this host."""

    #: To the recipient domain's MX: the agent looks it up (DNSSEC, MTA-STS) and delivers.
    MX = "mx"
    #: To the SMTP next hop Postfix chose (relayhost, sender-dependent relayhost, transport_maps, relay_domains
    #: via a relayhost): the agent delivers there under the same rules (RFC 8689 section 4.2.1).
    NEXTHOP = "nexthop"
    #: Delivered on this host by Postfix (local, virtual, discard, error, or a transport the admin declared
    #: local): the agent hands it back.
    HANDBACK = "handback"
    #: A transport that cannot carry REQUIRETLS on (LMTP or a pipe to elsewhere, a next hop that is not one SMTP
    #: destination): the agent bounces it, 5.7.30, rather than let Postfix send it without REQUIRETLS.
    REFUSE = "refuse"


#: Postfix delivery agents that deliver on this host.  local(8) may still forward a copy (an alias or .forward
#: that expands off-site): see :data:`LOCAL_GUARD`.
LOCAL_MAILERS = frozenset({"local", "virtual", "discard", "error"})

#: Next-hop value of a REQUIRETLS recipient that local(8) delivers.  On Postfix < 3.11 the agent hands it back
#: through the second re-injection smtpd, whose mail goes to a local(8) clone: the copies that clone forwards
#: (alias, .forward) come back to the agent with :data:`FORWARD_SUFFIX` on their address and keep REQUIRETLS
#: (RFC 8689 section 4.1: "all instances of the message MUST be tagged in the same manner").
LOCAL_GUARD = "local"

#: Next-hop value of a recipient going to its domain's MX.  Listed so that the agent can tell the recipients the
#: milter planned from those Postfix added afterwards (virtual alias expansions, see ``relay.local_domains``).
MX_PLAN = "mx"

#: Domain suffix the local(8) clone's forwarding cleanup puts on every address it forwards to, and that
#: transport_maps sends to the agent, which takes it off again.  ``.invalid`` (RFC 2606): never a real domain.
FORWARD_SUFFIX = ".requiretls-forward.invalid"


@dataclass(frozen=True, slots=True)
class RcptPlan:
    """Where one recipient goes.  ``value``: the next hop in Postfix form (NEXTHOP) or ``refuse:MAILER``."""

    address: str
    leg: Leg
    value: str = ""
    reason: str = ""


def plan_recipient(r: RcptRoute, relayhost: str = "", local_transports: frozenset[str] = frozenset()) -> RcptPlan:
    """The leg of one recipient from what Postfix's resolver said of it (``{rcpt_mailer}``, ``{rcpt_host}``).

    The invariant (issue "REQUIRETLS on every path"): a recipient is handed back to Postfix only when Postfix
    delivers it on this host; whatever Postfix would send over the network goes through the agent (MX or
    NEXTHOP) or is refused.  ``local_transports`` are ``MAILER`` or ``MAILER:HOST`` values the admin declared
    local (a mailbox server on this host reached over LMTP, a local pipe).
    """
    mailer = (r.mailer or "").lower()
    host = (r.host or "").strip()
    if not mailer:
        # Non-SMTP submissions (sendmail, pickup) carry no route macros: the relayhost if there is one, else
        # the recipient's MX.  Never a hand-back: that would be Postfix's own smtp without REQUIRETLS.
        if relayhost:
            return RcptPlan(r.address, Leg.NEXTHOP, relayhost, "no route macros: the configured relayhost")
        return RcptPlan(r.address, Leg.MX, "", "no route macros: the recipient's MX")
    if mailer in LOCAL_MAILERS or mailer in local_transports or f"{mailer}:{host}" in local_transports:
        return RcptPlan(r.address, Leg.HANDBACK, LOCAL_GUARD if mailer == "local" else "",
                        f"delivered on this host by {mailer}")
    if mailer not in _SMTP_MAILERS:
        return RcptPlan(r.address, Leg.REFUSE, f"refuse:{mailer}",
                        f"transport {mailer}:{host} is not declared local and cannot carry REQUIRETLS on")
    if _goes_to_mx(r):
        return RcptPlan(r.address, Leg.MX, "", "the recipient domain's MX")
    try:
        # Postfix 3.5+: a list of next hops (relayhost = [a], [b]) is tried in order.
        hops = [NextHop.parse(h) for h in _LIST_SEP.split(host) if h]
    except ValueError:
        return RcptPlan(r.address, Leg.REFUSE, f"refuse:{mailer}", f"next hop {host!r} is not SMTP destinations")
    if not hops or len(hops) > MAX_NEXTHOPS:
        return RcptPlan(r.address, Leg.REFUSE, f"refuse:{mailer}", f"next hop {host!r} is not SMTP destinations")
    value = NEXTHOP_LIST_SEP.join(str(h) for h in hops)
    return RcptPlan(r.address, Leg.NEXTHOP, value, f"next hop {', '.join(map(str, hops))} ({mailer})")


def plan_recipients(rcpts: Sequence[RcptRoute], relayhost: str = "",
                    local_transports: frozenset[str] = frozenset()) -> tuple[RcptPlan, ...]:
    return tuple(plan_recipient(r, relayhost, local_transports) for r in rcpts)


def split_plans(plans: Sequence[RcptPlan], optout: bool = False) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(hand-back list, next-hop list) from the plans.  The agent gives back what Postfix delivers on this
    host; for an opt-out message also the refused recipients (Postfix then applies the destination's normal
    policy, never weaker than the opt-out).  The next-hop list has (recipient, value) for the recipients the
    agent sends to a next hop of Postfix's choosing or, for REQUIRETLS, refuses, the recipients that go to their
    MX (:data:`MX_PLAN`), and (REQUIRETLS) the local(8) hand-backs marked :data:`LOCAL_GUARD`."""
    back_legs = (Leg.HANDBACK, Leg.REFUSE) if optout else (Leg.HANDBACK,)
    hop_legs = (Leg.NEXTHOP,) if optout else (Leg.NEXTHOP, Leg.REFUSE)
    hops = []
    for p in plans:
        if p.leg is Leg.MX:
            hops.append((p.address, MX_PLAN))
        elif p.leg in hop_legs or (not optout and p.leg is Leg.HANDBACK and p.value == LOCAL_GUARD):
            hops.append((p.address, p.value))
    return tuple(p.address for p in plans if p.leg in back_legs), tuple(hops)


def handback(rcpts: Sequence[RcptRoute], relayhost: str = "", local_transports: frozenset[str] = frozenset(),
             optout: bool = False) -> tuple[str, ...]:
    """The hand-back list of :func:`split_plans`."""
    return split_plans(plan_recipients(rcpts, relayhost, local_transports), optout)[0]


def nexthops(rcpts: Sequence[RcptRoute], relayhost: str = "", local_transports: frozenset[str] = frozenset(),
             optout: bool = False) -> tuple[tuple[str, str], ...]:
    """The next-hop list of :func:`split_plans`."""
    return split_plans(plan_recipients(rcpts, relayhost, local_transports), optout)[1]


#: Routes that end at the delivery agent, which reads the hand-back list.
AGENT_ROUTES = frozenset({Route.RELAY, Route.RELAY_OPTOUT, Route.REINJECT})


def route_edits(route: Route | None, handback_rcpts: Sequence[str] = (),
                hops: Sequence[tuple[str, str]] = ()) -> tuple[HeaderEdit, ...]:
    """The header fields that carry the route (and, for the agent, the hand-back list and the next hops)."""
    if route is None:
        return ()
    edits = [HeaderEdit("add", ROUTE_HEADER, str(route))]
    if handback_rcpts and route in AGENT_ROUTES:
        edits.append(HeaderEdit("add", HANDBACK_HEADER, format_handback(handback_rcpts)))
    if hops and route in AGENT_ROUTES:
        edits.append(HeaderEdit("add", NEXTHOP_HEADER, format_nexthops(hops)))
    return tuple(edits)


def with_route(decision: Decision, route: Route | None, handback_rcpts: Sequence[str] = (),
               hops: Sequence[tuple[str, str]] = ()) -> Decision:
    """The decision with the route header (and, for the agent, the hand-back list) added to its edits."""
    if route is None:
        return decision
    return replace(decision, header_edits=decision.header_edits + route_edits(route, handback_rcpts, hops))
