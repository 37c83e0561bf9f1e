"""The Postfix configuration for a given Postfix version (architecture: "How each Postfix version is driven").

Pure: the current values of the parameters we touch and our settings in, a :class:`Plan` out.  Applying it is
:mod:`requiretls.postfix.apply`'s job.

What every version gets:

* our milter first in ``smtpd_milters`` and ``non_smtpd_milters`` (so that a DKIM signer after it signs the
  edited message), with ``default_action=tempfail``: with the milter down, mail is deferred, never sent under
  the wrong policy;
* ``header_checks`` that drop inbound copies of the private route header (forgeries);
* ``milter_header_checks`` that turn the milter's route header into FILTER: ``relay`` to the delivery agent,
  ``relaxed`` to the opportunistic smtp clone;
* the relaxed smtp clone, whose TLS policy table keeps the normal policy for ``optout=no`` destinations;
* the re-injection smtpd (loopback, no milters, its own cleanup without the public header_checks) through
  which the agent hands back what Postfix delivers itself, and (3.11) re-injects rule-tagged REQUIRETLS mail
  with ``Require-TLS-ESMTP: yes``.  It must accept Internet recipients for the latter, so it admits loopback
  clients (``mynetworks = 127.0.0.0/8``); the agent only hands back what the milter listed.

Postfix 3.10+ also gets a ``header_checks`` REPLACE that renames a received ``TLS-Required`` so that Postfix
does not apply it before local governance has; the milter restores the field (postfix-verified.md §5).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from requiretls.addresses import Backend, ListenAddress
from requiretls.policy import LocalPolicy
from requiretls.policy.headers import ORIGINAL_TLS_REQUIRED, PRIVATE_HEADERS, ROUTE_HEADER, TLS_REQUIRED
from requiretls.policy.route import FORWARD_SUFFIX, PostfixFeatures, Route
from requiretls.policy.tlsmap import TLSRPT_SUFFIX

RELAXED_SERVICE = "requiretls-relaxed"
STRICT_SERVICE = "requiretls-strict"
REINJECT_CLEANUP_CHECKS = "requiretls_reinject_cleanup_checks"
CLEANUP_SERVICE = "requiretls-cleanup"
FILTER_CLEANUP_SERVICE = "requiretls-filter-cleanup"
HEADER_CHECKS = "requiretls_header_checks"
MILTER_HEADER_CHECKS = "requiretls_milter_header_checks"
REINJECT_HEADER_CHECKS = "requiretls_reinject_header_checks"
RELAXED_POLICY = "requiretls_relaxed_policy"
LOCAL_SERVICE = "requiretls-local"
LOCAL_REWRITE_SERVICE = "requiretls-rewrite"
FORWARD_CLEANUP_SERVICE = "requiretls-forward"
FORWARD_MAPS = "requiretls_forward"
TRANSPORT_MAPS = "requiretls_transport"
RELEASE_HEADER_CHECKS = "requiretls_release_header_checks"
BOUNCE_TEMPLATE = "requiretls_bounce_template"
DEFAULT_DELAY_WARNING = "1h"
MARK = "requiretls"

#: main.cf parameters whose current values the plan builds on.
READ_PARAMS = (
    "smtpd_milters",
    "non_smtpd_milters",
    "header_checks",
    "mime_header_checks",
    "nested_header_checks",
    "milter_header_checks",
    "smtp_tls_security_level",
    "smtp_tls_policy_maps",
    "transport_maps",
    "delay_warning_time",
    "bounce_template_file",
    "smtpd_forbid_bare_newline",
    "smtpd_forbid_bare_newline_exclusions",
    "content_filter",
)


class PlanError(Exception):
    """The live configuration cannot be wired safely as it is; the message says what to change."""


@dataclass(frozen=True, slots=True)
class PostfixEnv:
    """What ``postconf`` said about the instance."""

    version: PostfixFeatures
    config_directory: str
    queue_directory: str
    #: Raw values (``postconf -h``) of :data:`READ_PARAMS`; ``explicit`` names those set in main.cf.
    current: Mapping[str, str]
    explicit: frozenset[str] = frozenset()
    #: master.cf entries, ``service/type`` -> the entry on one line (``postconf -M``).
    master: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MasterEntry:
    service: str
    type: str
    line: str
    #: An existing entry of the admin's that we change (the content filter's return service), not a new one.
    adopt: bool = False
    #: ``service/type`` of the admin's entry this one replaces in place (the public smtpd moved behind the
    #: front): the admin's lines are kept verbatim in the journal and put back by ``--undo``.
    rename_from: str = ""


@dataclass(frozen=True, slots=True)
class Plan:
    main: tuple[tuple[str, str], ...]
    master: tuple[MasterEntry, ...]
    files: tuple[tuple[str, str], ...]
    #: List parameters to which we add one item (ours, first): parameter -> that item.  Undo removes only it.
    items: tuple[tuple[str, str], ...] = ()
    #: Decisions the admin should read (milter order, ``$smtpd_milters`` references), one line each.
    notes: tuple[str, ...] = ()


def postfix_socket(spec: str | ListenAddress, queue_directory: str) -> str:
    """A listen address (or its text, old forms included) -> Postfix's: ``unix:/qdir/x`` -> ``unix:x``
    (relative to the queue directory, so chrooted daemons reach it); ``inet:PORT@HOST`` -> ``inet:HOST:PORT``;
    IPv6 as ``inet:[::1]:PORT`` (Postfix's milter client knows only ``inet`` and ``unix``, milter8.c)."""
    address = spec if isinstance(spec, ListenAddress) else ListenAddress.parse(spec)
    return address.postfix(queue_directory)


def _split_list(value: str) -> list[str]:
    """Split a Postfix list value on commas/whitespace, keeping ``{ ... }`` groups whole."""
    items: list[str] = []
    depth, cur = 0, ""
    for ch in value:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if depth == 0 and (ch in ", \t\n"):
            if cur.strip():
                items.append(cur.strip())
            cur = ""
            continue
        cur += ch
    if cur.strip():
        items.append(cur.strip())
    return items


def _without_ours(items: list[str], ours: str) -> list[str]:
    target = re.sub(r"\s+", "", ours)
    return [i for i in items if re.sub(r"\s+", "", i) != target]


def _prepend(value: str, ours: str) -> str:
    return ", ".join([ours, *_without_ours(_split_list(value), ours)])


#: How ``non_smtpd_milters`` (and others) may name ``smtpd_milters``: each expands to that list.
SMTPD_MILTERS_REFS = ("$smtpd_milters", "${smtpd_milters}", "$(smtpd_milters)")


def _milter_lists(smtpd: str, non_smtpd: str, milter: str) -> tuple[str, str | None, list[str]]:
    """``smtpd_milters`` and ``non_smtpd_milters`` with our milter first in each and listed once after
    expansion (None: leave ``non_smtpd_milters`` as it is), and what was decided, for the plan."""
    notes = []
    listed = _split_list(smtpd)
    others = _without_ours(listed, milter)
    if others:
        notes.append(f"smtpd_milters: ours first, then {', '.join(others)} (a DKIM signer after ours signs the "
                     "message as we leave it)")
        if len(others) != len(listed) and _without_ours(listed[:1], milter):
            notes.append("smtpd_milters: our milter was not first; it is moved back to the front")
    items = _without_ours(_split_list(non_smtpd), milter)
    if items and all(i in SMTPD_MILTERS_REFS for i in items):
        # "$smtpd_milters": ours comes through the reference, first; listing it again would run it twice.
        notes.append(f"non_smtpd_milters = {items[0]}: our milter comes through it, once; left as it is")
        return _prepend(smtpd, milter), (None if [non_smtpd.strip()] == items[:1] else items[0]), notes
    if any(i in SMTPD_MILTERS_REFS for i in items):
        items = list(dict.fromkeys(x for i in items for x in (others if i in SMTPD_MILTERS_REFS else [i])))
        notes.append("non_smtpd_milters: $smtpd_milters written out in place, so that our milter is listed once")
    if items:
        notes.append(f"non_smtpd_milters: ours first, then {', '.join(items)}")
    return _prepend(smtpd, milter), ", ".join([milter, *items]), notes


def _options(line: str) -> tuple[list[str], list[tuple[str, str]]]:
    """A master.cf entry on one line -> its eight fields and command, and its ``-o name=value`` options."""
    tokens = line.split()
    head, rest = tokens[:8], tokens[8:]
    opts: list[tuple[str, str]] = []
    i = 0
    while i < len(rest):
        if rest[i] == "-o" and i + 1 < len(rest):
            name, _, value = rest[i + 1].partition("=")
            opts.append((name, value))
            i += 2
        else:
            head.append(rest[i])
            i += 1
    return head, opts


def _filtered_services(master: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """smtpd services that set a content filter, and smtpd services that clear it (a filter's return)."""
    setting: list[str] = []
    clearing: list[str] = []
    for key, line in master.items():
        head, opts = _options(line)
        ours = any(n == "syslog_name" and v.startswith(f"postfix/{MARK}-reinject") for n, v in opts)
        if len(head) < 8 or head[7] != "smtpd" or ours:  # our re-injection services (-local: content_filter)
            continue
        for name, value in opts:
            if name == "content_filter":
                (setting if value else clearing).append(key)
    return setting, clearing


def _filter_return(env: PostfixEnv, return_service: str | None) -> tuple[str | None, list[str]]:
    """The service/type at which the content filter hands mail back, or None without a content filter."""
    setting, clearing = _filtered_services(env.master)
    cf = env.current.get("content_filter", "")
    if not cf and not setting:
        return None, []
    where = f"content_filter = {cf}" if cf else f"-o content_filter in {', '.join(setting)}"
    if return_service:
        if return_service not in env.master:
            raise PlanError(f"--filter-return {return_service}: no such master.cf service")
        return return_service, [f"content filter ({where}): its return service is {return_service} (given)"]
    if len(clearing) != 1:
        found = ", ".join(clearing) or "none"
        raise PlanError(
            f"a content filter is configured ({where}) but its return service is not clear (smtpd services "
            f"with -o content_filter=: {found}); name it with --filter-return SERVICE/TYPE, e.g. "
            "--filter-return 127.0.0.1:10025/inet"
        )
    return clearing[0], [f"content filter ({where}): our routes are applied after it, at its return "
                         f"service {clearing[0]}; every message passes the filter once"]


def _adopt_return(key: str, line: str, version: PostfixFeatures) -> MasterEntry:
    """The filter's return smtpd with our cleanup (which turns the route header into FILTER) and without
    ``no_header_body_checks`` (which would switch that off); with ``no_milters`` where the service inherits the
    global milters, which ran once already on the way in."""
    service, kind = key.split("/", 1)
    head, opts = _options(line)
    values = dict(opts)
    out = [(n, v) for n, v in opts if n not in ("cleanup_service_name", "receive_override_options")]
    overrides = [o for o in values.get("receive_override_options", "").replace(",", " ").split()
                 if o != "no_header_body_checks"]
    if "smtpd_milters" not in values and "no_milters" not in overrides:
        overrides.append("no_milters")
    out.append(("cleanup_service_name", FILTER_CLEANUP_SERVICE))
    if overrides:
        out.append(("receive_override_options", ",".join(overrides)))
    text = " ".join(head + [f"-o {n}={v}" for n, v in out])
    del version
    return MasterEntry(service, kind, text, adopt=True)


def _filter_transports(env: PostfixEnv) -> list[str]:
    """The master.cf keys (``name/unix``) of the smtp/lmtp transports content filters send to (``amavis`` in
    ``content_filter = amavis:[127.0.0.1]:10024``, main.cf or ``-o content_filter=`` on an smtpd)."""
    setting, _ = _filtered_services(env.master)
    values = [env.current.get("content_filter", "")]
    values += [v for key in setting for n, v in _options(env.master[key])[1] if n == "content_filter"]
    keys: list[str] = []
    for value in values:
        transport = value.split(":", 1)[0].strip()
        key = f"{transport}/unix"
        head = _options(env.master.get(key, ""))[0]
        if transport and key not in keys and len(head) >= 8 and head[7] == "smtp":
            keys.append(key)
    return keys


def _adopt_filter_transport(key: str, line: str) -> MasterEntry | None:
    """Postfix 3.11 with our ``smtp_requiretls_policy`` (``enforce`` for every next hop the table does not
    exempt): the hop to a content filter on this host would demand REQUIRETLS (and authenticated TLS) from the
    filter, which amavisd-new does not offer, so native REQUIRETLS mail would bounce there.  That hop gets
    ``opportunistic``: the message keeps its class through the filter in Postfix's own ``Require-TLS-ESMTP:
    yes`` field (cleanup adds it, the filter passes it on, the return smtpd's cleanup turns it back into
    REQUIRETLS), and leaves this host under ``enforce``.  An entry that sets the parameter itself is kept."""
    head, opts = _options(line)
    if any(n == "smtp_requiretls_policy" for n, _ in opts):
        return None
    service, kind = key.split("/", 1)
    text = " ".join(head + [f"-o {n}={v}" for n, v in opts] + ["-o smtp_requiretls_policy=opportunistic"])
    return MasterEntry(service, kind, text, adopt=True)


def relaxed_policy_table(policy: LocalPolicy, default_level: str) -> str:
    """TLS policy for the relaxed clone: ``optout=no`` destinations keep their normal policy; everything else
    falls to the clone's ``may``.  (With the policy service running, its ``relaxed`` socketmap zone replaces
    this static table and adds DANE/MTA-STS discovery.)"""
    lines = [
        "# Generated by requiretls postfix-config from the policy table: destinations that refuse opt-out.",
        "# After changing the policy table: requiretls postfix-config --tables, then postfix reload (main.cf and",
        "# master.cf stay as they are).",
    ]
    for entry in policy.table:
        if entry.optout is not False:
            continue
        answer = entry.postfix_policy() or (default_level if default_level not in ("", "none", "may") else None)
        if answer is None:
            lines.append(f"# {entry.key}: normal policy is the main.cf level {default_level or 'none'!r}")
            continue
        lines.append(f"{entry.key}\t{answer}")
    return "\n".join(lines) + "\n"


def optout_loop(env: PostfixEnv, policy: LocalPolicy) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The opt-out loop's part of the plan (issue 19): main.cf settings and files.

    * ``delay_warning_time = 1h`` unless the admin set it: Postfix then tells every sender whose mail waits an
      hour, and the delay notice (``bounce_template_file``'s ``delay_template``, unless the admin has a template
      file) explains the TLS opt-out with the configured cookie.  ``requiretls notify`` adds the precise,
      per-message notice for local and authenticated senders.
    * Postfix < 3.10 (no ``TLS-Required: No`` of its own): a release rule for the re-injection cleanup, so that
      ``requiretls release --optout``'s copy, marked ``X-RequireTLS-Route: relaxed``, goes to the relaxed clone.
    """
    main: list[tuple[str, str]] = []
    files: list[tuple[str, str]] = []
    cdir = env.config_directory.rstrip("/")
    if "delay_warning_time" not in env.explicit:
        main.append(("delay_warning_time", DEFAULT_DELAY_WARNING))
    if "bounce_template_file" not in env.explicit:
        main.append(("bounce_template_file", f"{cdir}/{BOUNCE_TEMPLATE}"))
        files.append((BOUNCE_TEMPLATE, delay_template(policy.optout_cookie)))
    if not env.version.native_tls_required:
        files.append((RELEASE_HEADER_CHECKS, "\n".join([
            "# requiretls release --optout (Postfix < 3.10): the released copy goes to the relaxed smtp clone.",
            "# Only the re-injection cleanup reads this table; the clone removes the header before sending.",
            f"/^{ROUTE_HEADER}: {Route.RELAXED}$/ FILTER {RELAXED_SERVICE}:",
        ]) + "\n"))
    return main, files


_DELAY_TEMPLATE = """# Generated by requiretls postfix-config: Postfix's delay notice, with the TLS opt-out explained.
# Only delay_template is here; the other notices keep Postfix's built-in text.
delay_template = <<EOF
Charset: us-ascii
From: MAILER-DAEMON (Mail Delivery System)
Subject: Delayed Mail (still being retried)
Postmaster-Subject: Postmaster Warning: Delayed Mail

This is the mail system at host $myhostname.

####################################################################
# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #
####################################################################

Your message could not be delivered for more than $delay_warning_time_hours hour(s).
It will be retried until it is $maximal_queue_lifetime_days day(s) old.

If the report below says that TLS is required or that a server
certificate was not verified, the receiving side's security policy
(DANE or MTA-STS) could not be satisfied. If your message does not
need that protection, you may send it again with COOKIE in
the Subject, or with the header field "TLS-Required: No": it is then
delivered even without a secure connection. Some destinations do not
allow this, and messages sent with REQUIRETLS are never relaxed.

For further assistance, please send mail to postmaster.

                   The mail system
EOF
"""


def delay_template(cookie: str) -> str:
    """A bounce_template_file whose delay_template explains the opt-out with ``cookie`` (``$`` doubled: the
    template expands ``$name``)."""
    return _DELAY_TEMPLATE.replace("COOKIE", cookie.replace("$", "$$"))


def generate(env: PostfixEnv, policy: LocalPolicy, milter_socket: str | ListenAddress,
             relay_socket: str | ListenAddress, reinject: str,
             policyd_socket: str | ListenAddress | None = None, filter_return: str | None = None,
             reinject_local: str = "127.0.0.1:10027", front: str | None = None,
             front_service: str = "smtp/inet") -> Plan:
    """``policyd_socket``: wire the policy service in (DANE/MTA-STS for every delivery, the relaxed zone for
    opt-outs, the requiretls zone for 3.11's smtp_requiretls_policy); None: static tables only.
    ``reinject_local``: (Postfix < 3.11) the re-injection smtpd for REQUIRETLS recipients local(8) delivers.
    ``front``: (Postfix < 3.11) the loopback IP:PORT the public smtpd (or postscreen) moves to, behind the SMTP
    front (``requiretls front``), which then listens where smtpd did.

    With a content filter (``content_filter``, in main.cf or on an smtpd service), the route header does not
    FILTER on the way in (FILTER would override the content filter, so special mail would skip it): it
    travels through the filter, and our cleanup on the filter's return service (``filter_return``, or the one
    smtpd service that clears ``content_filter``) turns it into FILTER there."""
    cdir = env.config_directory.rstrip("/")
    sockmap = f"socketmap:{postfix_socket(policyd_socket, env.queue_directory)}" if policyd_socket else ""
    milter = f"{{ {postfix_socket(milter_socket, env.queue_directory)}, default_action=tempfail }}"
    relay = postfix_socket(relay_socket, env.queue_directory)
    hc = f"regexp:{cdir}/{HEADER_CHECKS}"
    mhc = f"regexp:{cdir}/{MILTER_HEADER_CHECKS}"
    smtpd_milters, non_smtpd_milters, notes = _milter_lists(
        env.current.get("smtpd_milters", ""), env.current.get("non_smtpd_milters", ""), milter)
    main: list[tuple[str, str]] = [("smtpd_milters", smtpd_milters)]
    items = [("smtpd_milters", milter)]
    if non_smtpd_milters is not None:
        main.append(("non_smtpd_milters", non_smtpd_milters))
        items.append(("non_smtpd_milters", milter))
    returned, filter_notes = _filter_return(env, filter_return)
    notes += filter_notes
    main += [
        ("header_checks", _prepend(env.current.get("header_checks", ""), hc)),
    ]
    items.append(("header_checks", hc))
    if returned is None:
        main.append(("milter_header_checks", _prepend(env.current.get("milter_header_checks", ""), mhc)))
        items.append(("milter_header_checks", mhc))
    # Postfix 3.10+ reads the TLSRPT policy attributes in MTA-STS answers (and needs them to enforce the policy's
    # MX patterns itself); before 3.10 they make the whole answer invalid.  The map name tells policyd which.
    tlsrpt = TLSRPT_SUFFIX if env.version.version >= (3, 10) else ""
    if sockmap:
        current_maps = ", ".join(_without_ours(_split_list(env.current.get("smtp_tls_policy_maps", "")),
                                               f"{sockmap}:default{TLSRPT_SUFFIX if not tlsrpt else ''}"))
        main.append(("smtp_tls_policy_maps", _prepend(current_maps, f"{sockmap}:default{tlsrpt}")))
        items.append(("smtp_tls_policy_maps", f"{sockmap}:default{tlsrpt}"))
        if env.version.native_requiretls:
            main.append(("smtp_requiretls_policy", f"{sockmap}:requiretls"))
    if env.version.version < (3, 9) and "smtpd_forbid_bare_newline" not in env.explicit:
        # SMTP smuggling (issue 17): before 3.9 Postfix ends DATA at a bare-LF dot by default, so a client (or a
        # trusted relay that forwards such content) can start a second message inside the first, which then
        # inherits the client's trust for TLS-Required: No and the subject cookies.  normalize is 3.9's default
        # (3.7.10+ and 3.8.5+ know it); an admin's own setting is kept.  Its default exclusions ($mynetworks)
        # would leave exactly the trusted relays open (measured on 3.7.11; 3.10 and 3.11 refuse a bare-LF end of
        # DATA from $mynetworks as well), so they go too, unless the admin set them.
        main.append(("smtpd_forbid_bare_newline", "normalize"))
        if "smtpd_forbid_bare_newline_exclusions" not in env.explicit:
            main.append(("smtpd_forbid_bare_newline_exclusions", ""))
    # mime_ and nested_header_checks default to $header_checks: keep them on the admin's own tables so that
    # attached messages' headers are left alone.
    admin_hc = ", ".join(_without_ours(_split_list(env.current.get("header_checks", "")), hc))
    for name in ("mime_header_checks", "nested_header_checks"):
        if name not in env.explicit:
            main.append((name, admin_hc))

    header_rules = [
        "# requiretls: inbound copies of the private headers are forgeries.",
        f"/^({'|'.join(PRIVATE_HEADERS)}):/ IGNORE",
    ]
    if env.version.native_tls_required:
        header_rules += [
            f"# Postfix {env.version.version[0]}.{env.version.version[1]} would apply a received TLS-Required: No",
            "# before local governance (optout=no, optout_from); the milter decides and restores the field.",
            f"/^{TLS_REQUIRED}:(.*)$/ REPLACE {ORIGINAL_TLS_REQUIRED}:$1",
        ]
    milter_rules = [
        "# requiretls: the milter's route header selects the delivery path (FILTER covers every recipient).",
        f"/^{ROUTE_HEADER}: ({Route.RELAY}|{Route.RELAY_OPTOUT}|{Route.REINJECT})$/ FILTER lmtp:{relay}",
        f"/^{ROUTE_HEADER}: {Route.RELAXED}$/ FILTER {RELAXED_SERVICE}:",
    ]
    if env.version.native_requiretls:
        milter_rules.append(f"/^{ROUTE_HEADER}: {Route.STRICT}$/ FILTER {STRICT_SERVICE}:")
    reinject_rules = [
        "# requiretls re-injection and relaxed delivery: only the private headers go; TLS-Required and",
        "# Require-TLS-ESMTP stay.",
        f"/^({'|'.join(PRIVATE_HEADERS)}):/ IGNORE",
    ]
    loop_main, loop_files = optout_loop(env, policy)
    main += loop_main
    release_hc = f"regexp:{cdir}/{RELEASE_HEADER_CHECKS}," if any(n == RELEASE_HEADER_CHECKS
                                                                  for n, _ in loop_files) else ""
    files: tuple[tuple[str, str], ...] = (
        (HEADER_CHECKS, "\n".join(header_rules) + "\n"),
        (MILTER_HEADER_CHECKS, "\n".join(milter_rules) + "\n"),
        (REINJECT_HEADER_CHECKS, "\n".join(reinject_rules) + "\n"),
        (RELAXED_POLICY, relaxed_policy_table(policy, env.current.get("smtp_tls_security_level", ""))),
        *loop_files,
    )
    master: tuple[MasterEntry, ...] = (
        MasterEntry(
            RELAXED_SERVICE,
            "unix",
            f"{RELAXED_SERVICE} unix - - n - - smtp -o syslog_name=postfix/{RELAXED_SERVICE} "
            "-o smtp_tls_security_level=may -o smtp_tls_policy_maps="
            + (f"{sockmap}:relaxed{tlsrpt}" if sockmap else f"texthash:{cdir}/{RELAXED_POLICY}")
            # the route header served its purpose: it does not go to the next hop
            + f" -o smtp_header_checks=regexp:{cdir}/{REINJECT_HEADER_CHECKS}",
        ),
        MasterEntry(
            CLEANUP_SERVICE,
            "unix",
            f"{CLEANUP_SERVICE} unix n - n - 0 cleanup -o syslog_name=postfix/{CLEANUP_SERVICE} "
            f"-o header_checks={release_hc}regexp:{cdir}/{REINJECT_HEADER_CHECKS} -o mime_header_checks= "
            "-o nested_header_checks= -o body_checks= -o milter_header_checks=",
        ),
        MasterEntry(
            reinject,
            "inet",
            f"{reinject} inet n - n - - smtpd -o syslog_name=postfix/requiretls-reinject "
            f"-o cleanup_service_name={CLEANUP_SERVICE} -o smtpd_milters= -o non_smtpd_milters= "
            "-o content_filter= -o receive_override_options=no_address_mappings,no_milters "
            "-o smtpd_client_restrictions= -o smtpd_helo_restrictions= -o smtpd_sender_restrictions= "
            "-o smtpd_relay_restrictions= -o smtpd_recipient_restrictions=permit_mynetworks,reject "
            "-o smtpd_data_restrictions= -o smtpd_end_of_data_restrictions= -o mynetworks=127.0.0.0/8 "
            "-o smtpd_tls_security_level=none -o smtpd_sasl_auth_enable=no",
        ),
    )
    if not env.version.native_requiretls:
        if reinject_local == reinject:
            raise PlanError(f"[relay] reinject and reinject_local are both {reinject}: they must differ")
        reinject_line = next(m.line for m in master if m.service == reinject)
        guard_main, guard_master, guard_files = _local_guard(env, relay, reinject_local, reinject_line)
        main += guard_main
        items += [(name, value.split(",")[0].strip()) for name, value in guard_main]
        master += guard_master
        files += guard_files
    else:
        master, files = _strict_route(cdir, sockmap, master, files, tlsrpt)
    if returned is not None:
        master += (
            MasterEntry(
                FILTER_CLEANUP_SERVICE,
                "unix",
                f"{FILTER_CLEANUP_SERVICE} unix n - n - 0 cleanup -o syslog_name=postfix/{FILTER_CLEANUP_SERVICE} "
                f"-o header_checks=regexp:{cdir}/{MILTER_HEADER_CHECKS} -o mime_header_checks= "
                "-o nested_header_checks= -o body_checks= -o milter_header_checks="
                # the milter restored TLS-Required as a milter header, which Postfix does not apply; coming back
                # from the filter it is an ordinary header, which Postfix 3.10+ would apply before local governance
                + (" -o tls_required_enable=no" if env.version.native_tls_required else ""),
            ),
            _adopt_return(returned, env.master[returned], env.version),
        )
        if env.version.native_requiretls and sockmap:
            for key in _filter_transports(env):
                entry = _adopt_filter_transport(key, env.master[key])
                if entry is not None:
                    master += (entry,)
                    notes.append(f"content filter transport {key}: -o smtp_requiretls_policy=opportunistic (the "
                                 "hop to the filter on this host; REQUIRETLS is kept through it by Require-TLS-ESMTP "
                                 "and enforced after it)")
    if front is not None:
        front_master, front_notes = _front(env, front, front_service)
        master += front_master
        notes += front_notes
    return Plan(tuple(main), master, files, tuple(items), tuple(notes))


#: The smtpd options behind the SMTP front: the real client address from the PROXY header; the daemon name
#: by which the milter knows the session came through the front; no TLS of its own (the front terminated
#: it) and therefore no "AUTH only over TLS" (the front enforces that itself); no BDAT (the front reads the
#: message as lines).
FRONT_SMTPD_OPTIONS = (
    ("milter_macro_daemon_name", "requiretls-front"),
    ("smtpd_tls_security_level", "none"),
    ("smtpd_tls_auth_only", "no"),
    ("smtpd_discard_ehlo_keywords", "chunking,silent-discard"),
)


def _with_options(line: str, service: str, extra: tuple[tuple[str, str], ...]) -> str:
    head, opts = _options(line)
    names = {n for n, _ in extra}
    kept = [(n, v) for n, v in opts if n not in names]
    return " ".join([service, *head[1:]] + [f"-o {n}={v}" for n, v in (*kept, *extra)])


def _front(env: PostfixEnv, backend: str, service: str = "smtp/inet") -> tuple[tuple[MasterEntry, ...], list[str]]:
    """Move the public ``service`` (``smtp/inet``: smtpd, or postscreen with its ``smtpd/pass``) to ``backend``,
    reading the PROXY protocol; the front takes its place.  The admin's entry is kept in the journal and
    comes back with ``--undo``."""
    if env.version.native_requiretls:
        raise PlanError("--front: Postfix 3.11 and later receive REQUIRETLS themselves; the front is for 3.7-3.10")
    try:
        target = Backend.parse(backend, 10028)
    except ValueError as e:
        raise PlanError(f"--front: front.backend: {e}") from None
    name, kind, private = str(target.endpoint), "inet", None
    if target.endpoint is None:
        unix = target.master_service(env.queue_directory)
        if unix is None:
            raise PlanError(f"--front: front.backend {target}: a unix backend must be public/NAME (or private/NAME) "
                            "under Postfix's queue_directory, where master(8) makes a unix service's socket")
        name, kind, private = unix[0], "unix", "y" if unix[1] else "n"
    public = env.master.get(service)
    if public is None:
        # Applied before: the entry is already at the backend address (ours, options and all).
        moved = env.master.get(f"{name}/{kind}", "")
        if "_upstream_proxy_protocol=haproxy" in moved:
            public = moved
    if public is None:
        # Moved by an earlier --front to another backend (the default was loopback TCP before it was a unix
        # socket): say where, rather than that there is nothing to move.
        earlier = [key for key, line in env.master.items()
                   if ("smtpd_upstream_proxy_protocol=haproxy" in line and "=requiretls-front" in line)
                   or "postscreen_upstream_proxy_protocol=haproxy" in line]
        if earlier:
            raise PlanError(f"--front: an earlier --front moved {service} to {earlier[0]}, not to front.backend "
                            f"{target}: set front.backend to match it, or run --undo and then --front again")
        raise PlanError(f"--front: master.cf has no {service} service to put the front in front of")
    head, _ = _options(public)
    command = head[7] if len(head) >= 8 else ""
    entries: list[MasterEntry] = []
    if command == "smtpd":
        line = _with_options(public, name, (("smtpd_upstream_proxy_protocol", "haproxy"), *FRONT_SMTPD_OPTIONS))
        if private is not None:
            # The same process settings (unprivileged, chroot, process limit), on a socket of its own.
            fields = line.split()
            line = " ".join([fields[0], "unix", private, *fields[3:]])
        entries.append(MasterEntry(name, kind, line, rename_from=service))
        where = "smtpd"
    elif command == "postscreen" and private is not None:
        raise PlanError(f"--front: {service} runs postscreen, which listens on TCP only: set front.backend to a "
                        "loopback IP:PORT (e.g. 127.0.0.1:10028)")
    elif command == "postscreen":
        passed = env.master.get("smtpd/pass")
        if passed is None:
            raise PlanError(f"--front: {service} runs postscreen but master.cf has no smtpd/pass service")
        entries.append(MasterEntry(name, "inet", _with_options(
            public, name, (("postscreen_upstream_proxy_protocol", "haproxy"),)), rename_from=service))
        entries.append(MasterEntry("smtpd", "pass", _with_options(passed, "smtpd", FRONT_SMTPD_OPTIONS), adopt=True))
        where = "postscreen (and smtpd/pass behind it)"
    else:
        raise PlanError(f"--front: {service} runs {command or 'nothing'}, not smtpd or postscreen; not touching it")
    return tuple(entries), [f"SMTP front: {where} moved from {service} to {target} with the PROXY protocol; "
                            "start requiretls-front.service, which listens where smtpd did (front.listen)"]


def _strict_route(cdir: str, sockmap: str, master: tuple[MasterEntry, ...], files: tuple[tuple[str, str], ...],
                  tlsrpt: str = "") -> tuple[tuple[MasterEntry, ...], tuple[tuple[str, str], ...]]:
    """Postfix 3.11: the strict smtp clone for REQUIRETLS mail whose recipients all go to their MX.

    3.11 enforces REQUIRETLS itself, but only at the TLS level smtp_tls_policy_maps gives; the ``default`` zone
    leaves a DNSSEC-signed MX without TLSA at ``may`` (so as not to make ordinary mail PKIX-strict), and 3.11
    then refuses the REQUIRETLS message with 5.7.10 although RFC 8689 allows that MX.  The clone asks the
    ``strict`` zone instead.  Native REQUIRETLS mail reaches it through the milter's route header; rule-tagged
    mail the agent re-injects, through the same header read by the re-injection cleanup.  Without the policy
    service the clone keeps main.cf's TLS policy (no better, no worse than Postfix's own smtp).
    """
    route_rule = f"/^{ROUTE_HEADER}: {Route.STRICT}$/ FILTER {STRICT_SERVICE}:"
    reinject_text = dict(files)[REINJECT_HEADER_CHECKS]
    cleanup_checks = ("# requiretls (3.11): re-injected REQUIRETLS mail for MX recipients goes to the strict clone\n"
                      + route_rule + "\n" + reinject_text)
    policy = f" -o smtp_tls_policy_maps={sockmap}:strict{tlsrpt}" if sockmap else ""
    strict = MasterEntry(
        STRICT_SERVICE,
        "unix",
        f"{STRICT_SERVICE} unix - - n - - smtp -o syslog_name=postfix/{STRICT_SERVICE}{policy}"
        # the route header served its purpose: it does not go to the next hop
        f" -o smtp_header_checks=regexp:{cdir}/{REINJECT_HEADER_CHECKS}",
    )
    out = []
    for m in master:
        if m.service == CLEANUP_SERVICE:
            m = MasterEntry(m.service, m.type, m.line.replace(
                f"-o header_checks=regexp:{cdir}/{REINJECT_HEADER_CHECKS}",
                f"-o header_checks=regexp:{cdir}/{REINJECT_CLEANUP_CHECKS}"))
        out.append(m)
    return (strict, *out), (*files, (REINJECT_CLEANUP_CHECKS, cleanup_checks))


def _local_guard(env: PostfixEnv, relay: str, reinject_local: str, reinject_line: str
                 ) -> tuple[list[tuple[str, str]], tuple[MasterEntry, ...], tuple[tuple[str, str], ...]]:
    """Postfix < 3.11: REQUIRETLS for what local(8) forwards (RFC 8689 section 4.1, "all instances of the
    message MUST be tagged in the same manner").

    Postfix 3.7-3.10 sends a copy that local(8) forwards for an alias or .forward through cleanup without
    milters, header_checks or FILTER, so nothing of ours would see it and it would leave without REQUIRETLS.
    So the agent hands REQUIRETLS recipients of local(8) back through a second re-injection smtpd whose
    content_filter is a local(8) clone.  That clone resolves through a trivial-rewrite clone in which local
    addresses belong to the clone itself (so an alias to a local user is delivered in the same process, with
    that user's .forward under the same rule), and forwards through a cleanup clone whose virtual_alias_maps
    puts FORWARD_SUFFIX on every forwarded address; transport_maps sends those addresses to the agent, which
    takes the suffix off and delivers with REQUIRETLS (or bounces 5.7.30 / 5.7.10).
    """
    cdir = env.config_directory.rstrip("/")
    suffix = FORWARD_SUFFIX.replace(".", "\\.")
    forward_rules = "\n".join([
        "# requiretls: every address the REQUIRETLS local(8) clone forwards to goes to the agent (transport_maps",
        f"# {TRANSPORT_MAPS}), which takes the suffix off again and delivers with REQUIRETLS.",
        f"if !/{suffix}$/",
        f"/^(.*@.+)$/\t${{1}}{FORWARD_SUFFIX}",
        "endif",
    ]) + "\n"
    transport_rules = "\n".join([
        "# requiretls: forwarded copies of REQUIRETLS messages (see requiretls_forward) go to the agent.",
        f"/{suffix}$/\tlmtp:{relay}",
    ]) + "\n"
    main = [("transport_maps", _prepend(env.current.get("transport_maps", ""), f"regexp:{cdir}/{TRANSPORT_MAPS}"))]
    options = reinject_line.partition(" inet ")[2]
    master = (
        MasterEntry(
            reinject_local,
            "inet",
            f"{reinject_local} inet "
            + options.replace("postfix/requiretls-reinject", "postfix/requiretls-reinject-local")
            .replace("-o content_filter= ", f"-o content_filter={LOCAL_SERVICE}: "),
        ),
        MasterEntry(
            LOCAL_SERVICE,
            "unix",
            f"{LOCAL_SERVICE} unix - n n - - local -o syslog_name=postfix/{LOCAL_SERVICE} "
            f"-o rewrite_service_name={LOCAL_REWRITE_SERVICE} -o cleanup_service_name={FORWARD_CLEANUP_SERVICE}",
        ),
        MasterEntry(
            LOCAL_REWRITE_SERVICE,
            "unix",
            f"{LOCAL_REWRITE_SERVICE} unix - - n - - trivial-rewrite -o syslog_name=postfix/{LOCAL_REWRITE_SERVICE} "
            f"-o local_transport={LOCAL_SERVICE}:$myhostname",
        ),
        MasterEntry(
            FORWARD_CLEANUP_SERVICE,
            "unix",
            f"{FORWARD_CLEANUP_SERVICE} unix n - n - 0 cleanup -o syslog_name=postfix/{FORWARD_CLEANUP_SERVICE} "
            f"-o virtual_alias_maps=regexp:{cdir}/{FORWARD_MAPS}",
        ),
    )
    return main, master, ((FORWARD_MAPS, forward_rules), (TRANSPORT_MAPS, transport_rules))


def render(plan: Plan, env: PostfixEnv) -> str:
    """The plan as an admin reads it: main.cf lines, master.cf entries and the table files."""
    v = env.version.version
    out = [
        f"# requiretls for Postfix {v[0]}.{v[1]} (config_directory {env.config_directory})",
        "# Apply with: requiretls postfix-config --apply   (undo: --apply --undo), then: postfix reload",
        "# After a policy table change: requiretls postfix-config --tables, then: postfix reload",
        "",
        "# ---- main.cf ----",
    ]
    out += [f"{k} = {val}" for k, val in plan.main]
    out += ["", "# ---- master.cf ----"]
    for m in plan.master:
        first, *rest = m.line.split(" -o ")
        out.append(first)
        out += [f"  -o {r}" for r in rest]
    for name, text in plan.files:
        out += ["", f"# ---- {env.config_directory.rstrip('/')}/{name} ----", text.rstrip("\n")]
    set_here = dict(plan.main)
    if "delay_warning_time" in set_here:
        out += ["", f"# delay_warning_time was not set in main.cf: set to {set_here['delay_warning_time']} so that "
                "senders hear of mail that TLS policy holds", "# (requiretls notify tells local senders more)."]
    if "bounce_template_file" in set_here:
        out.append("# bounce_template_file: Postfix's delay notice, plus how to opt out with "
                   "TLS-Required: No or the subject cookie.")
    if env.version.native_requiretls:
        out += [
            "",
            "# Postfix 3.11+: MAIL FROM REQUIRETLS is received and enforced natively (requiretls_enable = yes);",
            "# the milter routes only rule-tagged REQUIRETLS messages to the agent, which re-injects them with",
            "# Require-TLS-ESMTP: yes.",
        ]
    elif env.version.native_tls_required:
        out += ["", "# Postfix 3.10: REQUIRETLS goes through the agent; the milter governs TLS-Required."]
    else:
        out += ["", "# Postfix 3.7-3.9: both REQUIRETLS and TLS-Required: No are handled by the plugin."]
    return "\n".join(out) + "\n"
