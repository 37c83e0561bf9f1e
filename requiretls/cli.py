"""The ``requiretls`` command.

Exit status, as Postfix tools and compilers do: 0 success, 1 a negative answer (e.g. ``check`` says not
possible), 2 a configuration, usage or lookup error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from requiretls import __version__
from requiretls.config import load, render_default_config
from requiretls.errors import ConfigError
from requiretls.policy import (
    Classification,
    Decision,
    DestinationReadiness,
    Envelope,
    MessageFacts,
    PostfixFeatures,
    RcptRoute,
    Readiness,
    Session,
    classify,
    parse_header_block,
)

# Subcommands that live with their component: module -> (name, help).  Each module exposes
# ``add_arguments(parser)`` and ``run(args) -> int``; a component that is not installed is simply not offered.
_PLUGINS = {
    "requiretls.check": ("check", "report what a destination offers and whether REQUIRETLS can reach it"),
    "requiretls.milter.app": ("milter", "run the milter that tags messages and steers their delivery"),
    "requiretls.postfix.cli": ("postfix-config", "print or apply the Postfix configuration for this version"),
    "requiretls.policyd.cli": ("policyd", "run the socketmap TLS policy service for smtp_tls_policy_maps"),
    "requiretls.relay.cli": ("relay", "run the REQUIRETLS delivery agent (LMTP in from Postfix, SMTP out)"),
    "requiretls.front.cli": ("front", "run the SMTP front that receives REQUIRETLS for Postfix 3.7-3.10 (optional)"),
}
#: Modules with several subcommands: ``COMMANDS = {name: (help, add_arguments, run)}``.
_MULTI_PLUGINS = ("requiretls.notify.cli",)


def _explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="config file (default: built-in defaults, no tables)")
    p.add_argument("--sender", required=True, metavar="ADDR", help="envelope sender; '' or '<>' for null")
    p.add_argument("--rcpt", required=True, action="append", metavar="ADDR", help="envelope recipient (repeat)")
    p.add_argument("--esmtp", action="append", default=[], metavar="PARAM", help="MAIL FROM parameter (repeat)")
    p.add_argument("--sasl-user", metavar="NAME", help="SASL login name of the client")
    p.add_argument("--client-ip", metavar="IP", help="client address (trusted_networks are checked)")
    p.add_argument(
        "--tls", nargs="?", const="TLSv1.3", metavar="VERSION", help="the client used TLS (default TLSv1.3)"
    )
    p.add_argument(
        "--impossible",
        action="append",
        default=[],
        metavar="DOMAIN[=REASON]",
        help="pretend pre-flight found REQUIRETLS delivery to DOMAIN impossible (to try policy.preflight)",
    )
    p.add_argument(
        "--postfix-version",
        default=None,
        metavar="X.Y",
        help="Postfix version whose routing to show (default: milter.postfix_version, else 3.7)",
    )
    p.add_argument(
        "--mta",
        choices=("auto", "postfix", "sendmail"),
        default=None,
        help="the MTA the milter runs in (default: milter.mta); sendmail shows the REQUIRETLS refusal",
    )
    p.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="RCPT=MAILER[:HOST]",
        help="what Postfix's resolver says of a recipient ({rcpt_mailer}, {rcpt_host}), e.g. "
        "u@example.org=local or b@example.net=smtp:[relay.example]:587 (repeat; default smtp to its MX)",
    )
    p.add_argument("--relayhost", default=None, metavar="HOST", help="Postfix's relayhost (default: relay.relayhost)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("message", nargs="?", metavar="FILE", help="the message (default: standard input)")


def _routes(rcpts: Sequence[str], specs: Sequence[str]) -> tuple[RcptRoute, ...]:
    """``--route RCPT=MAILER[:HOST]`` for some recipients; the others go over SMTP to their domain's MX."""
    given: dict[str, RcptRoute] = {}
    for spec in specs:
        rcpt, eq, target = spec.rpartition("=")
        mailer, _, host = target.partition(":")
        if not eq or not rcpt or not mailer:
            raise ValueError(f"--route {spec!r}: expected RCPT=MAILER[:HOST]")
        if rcpt not in rcpts:
            raise ValueError(f"--route {spec!r}: {rcpt} is not a --rcpt")
        given[rcpt] = RcptRoute(rcpt, mailer, host or None)
    return tuple(given.get(r) or RcptRoute(r, "smtp", None) for r in rcpts)


def _explain(args: argparse.Namespace) -> int:
    settings = load(args.config)
    try:
        routes = _routes(args.rcpt, args.route)
    except ValueError as e:
        print(f"requiretls explain: {e}", file=sys.stderr)
        return 2
    raw = sys.stdin.buffer.read() if args.message in (None, "-") else _read_bytes(args.message)
    readiness = []
    for item in args.impossible:
        domain, _, why = item.partition("=")
        readiness.append((domain.lower(), DestinationReadiness(Readiness.IMPOSSIBLE, why or "pre-flight check")))
    facts = MessageFacts(
        envelope=Envelope(args.sender, tuple(args.rcpt), tuple(args.esmtp)),
        session=Session(args.sasl_user, args.client_ip, args.tls),
        headers=parse_header_block(raw),
        readiness=tuple(readiness),
    )
    mta = args.mta or settings.milter.mta
    version = args.postfix_version or settings.milter.postfix_version or "3.7"
    configured = settings.milter.relayhost
    relayhost = args.relayhost if args.relayhost is not None else (str(configured) if configured else "")
    result = classify(facts, settings.local_policy, PostfixFeatures.configured(mta, version),
                      routes, relayhost, local_transports=settings.milter.local_transports)
    if args.json:
        print(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    else:
        print(format_classification(result))
    return 0


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def format_decision(d: Decision) -> str:
    """The readable form of ``requiretls explain``."""
    out = [f"class:       {d.msg_class}"]
    out += ["reasons:"] + [f"  - {r}" for r in d.reasons]
    out.append("recipients:")
    width = max((len(r.recipient) for r in d.recipients), default=0)
    for r in d.recipients:
        out.append(f"  {r.recipient:<{width}}  {r.msg_class!s:<10}  {'; '.join(r.reasons)}")
    out.append("header edits:" + ("" if d.header_edits else " none"))
    for e in d.header_edits:
        if e.action == "add":
            out.append(f"  add     {e.name}: {e.value}")
        elif e.action == "change":
            out.append(f"  change  {e.name}[{e.index}]: {e.value}")
        else:
            out.append(f"  delete  {e.name}[{e.index}]")
    out.append("envelope:    " + (" ".join(d.envelope_params) or "unchanged"))
    out.append("reject:      " + (f"{d.reject.code} {d.reject.dsn} {d.reject.text}" if d.reject else "no"))
    return "\n".join(out)


def format_classification(c: Classification) -> str:
    """:func:`format_decision` with the route the message takes."""
    route = str(c.route) if c.route is not None else "postfix (normal delivery)"
    if c.handback:
        route += "; handed back to Postfix: " + ", ".join(c.handback)
    return f"{format_decision(c.decision)}\nroute:       {route}"


def _default_config(args: argparse.Namespace) -> int:
    print(render_default_config())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="requiretls", description="RFC 8689 REQUIRETLS for Postfix")
    parser.add_argument("--version", action="version", version=f"requiretls {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("explain", help="dry-run the decision for one message read from standard input")
    _explain_args(p)
    p.set_defaults(func=_explain)
    p = sub.add_parser("default-config", help="print a commented config file with every default")
    p.set_defaults(func=_default_config)
    for module_name, (name, help_text) in _PLUGINS.items():
        try:
            module: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    for module_name in _MULTI_PLUGINS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, (help_text, add, run) in module.COMMANDS.items():
            p = sub.add_parser(name, help=help_text)
            add(p)
            p.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    except OSError as e:
        print(f"requiretls: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
