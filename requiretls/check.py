"""``requiretls check DOMAIN``: what a destination offers and whether REQUIRETLS can reach it.

For a Postfix admin, and for a user wondering why a message bounced.  The verdict is
:func:`requiretls.policy.eligibility.judge`, the same one the delivery agent acts on.  Exit status: 0
REQUIRETLS delivery possible, 1 not possible (the agent would bounce), 2 lookup trouble (the agent would
defer: DNS trouble, MTA-STS policy not learnt, MX not reachable now) or bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, TextIO

from requiretls.addresses import Endpoint
from requiretls.dest import (
    DaneState,
    DestError,
    Destination,
    DestinationResolver,
    DnsClient,
    Prober,
    ProbeSettings,
    ResolverSettings,
    SessionResult,
    StsResolver,
    StsSettings,
)
from requiretls.policy.eligibility import Outcome, Verdict, candidates, judge

EXIT_POSSIBLE, EXIT_NOT_POSSIBLE, EXIT_LOOKUP_ERROR = 0, 1, 2


def parse_resolver(text: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT``, ``IPv6`` or ``[IPv6]:PORT`` -> (address, port); the config's own parse."""
    endpoint = Endpoint.parse(text, 53)
    return endpoint.host, endpoint.port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("domain", metavar="DOMAIN", help="recipient domain to check")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--probe", action="store_true",
                        help="connect to each validated MX: STARTTLS, certificate, REQUIRETLS after TLS")
    parser.add_argument("--resolver", metavar="IP[:PORT]",
                        help="trusted DNSSEC-validating resolver (default: first nameserver of /etc/resolv.conf)")
    parser.add_argument("--check-name", metavar="NAME", default=".",
                        help="DNSSEC-signed name whose answer must carry the AD bit for the resolver to count as "
                             "validating (default: the root zone)")
    parser.add_argument("--cafile", metavar="FILE",
                        help="CA certificates for PKIX checks of MTA-STS hosts and MX servers (default: system)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="seconds for one DNS lookup (default 5)")
    parser.add_argument("--probe-timeout", type=float, default=20.0, metavar="SECONDS",
                        help="seconds for each SMTP probe step (default 20)")
    parser.add_argument("--fetch-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="seconds for the MTA-STS policy fetch (default 30)")
    parser.add_argument("--helo", metavar="NAME", help="EHLO name for probes (default: this host's FQDN)")
    parser.add_argument("--smtp-port", type=int, default=25, help=argparse.SUPPRESS)
    parser.add_argument("--https-port", type=int, default=443, help=argparse.SUPPRESS)


async def _check(args: argparse.Namespace) -> tuple[Destination, dict[str, SessionResult] | None]:
    address, port = parse_resolver(args.resolver) if args.resolver else (None, 53)
    dns_client = DnsClient(ResolverSettings(address=address, port=port, timeout=args.timeout))
    sts = StsResolver(dns_client, StsSettings(cafile=args.cafile, fetch_timeout=args.fetch_timeout,
                                              https_port=args.https_port))
    check = await dns_client.check_resolver(ask_remote=True, name=args.check_name)
    if check.validates is False:
        raise UntrustedResolver(f"resolver {check.address}:{check.port} {check.detail}")
    dest = await DestinationResolver(dns_client, sts).lookup(args.domain)
    probes: dict[str, SessionResult] | None = None
    if args.probe:
        prober = Prober(ProbeSettings(port=args.smtp_port, timeout=args.probe_timeout, cafile=args.cafile,
                                      helo_name=args.helo))
        hosts = [h for h in dest.hosts if h.usable]
        probes = {r.host: r for r in await prober.probe_hosts(dest, hosts)}
    return dest, probes


#: Exit status of each verdict: the agent's bounce is 1, its deferral the lookup-error 2.
EXIT_CODE = {Outcome.DELIVER: EXIT_POSSIBLE, Outcome.BOUNCE: EXIT_NOT_POSSIBLE, Outcome.DEFER: EXIT_LOOKUP_ERROR}


def verdict_line(verdict: Verdict) -> str:
    if verdict.outcome is Outcome.DEFER:
        answer, reason = "no", f"lookup error, try later: {verdict.reason}"
    elif verdict.deliverable:
        answer, reason = "yes", verdict.reason + ("" if verdict.probed else " (use --probe)")
    else:
        answer, reason = "no", verdict.reason
    code = f" [{verdict.dsn}]" if verdict.dsn else ""
    return f"REQUIRETLS delivery possible: {answer} — {reason}{code}"


def render_text(dest: Destination, probes: dict[str, SessionResult] | None, verdict: Verdict,
                out: TextIO) -> None:
    w = out.write
    cands = candidates(dest)
    w(f"Domain: {dest.domain}\n")
    w(f"MX: {dest.source.value}, DNSSEC {dest.mx_state.value}\n")
    for h in dest.hosts:
        addrs = ", ".join(h.addresses) or "-"
        w(f"  {h.preference:>3} {h.name}  [{addrs}]  address DNSSEC {h.address_state.value}"
          f"{'' if h.mx_secure else ', MX insecure'}\n")
        if h.tlsa_state is not None:
            w(f"      TLSA _{25}._tcp.{h.tlsa_base or h.name}: DNSSEC {h.tlsa_state.value}, DANE {h.dane.value}\n")
        elif h.dane is DaneState.NOT_APPLICABLE:
            w("      TLSA: not looked up (MX or address not DNSSEC-secure)\n")
        for r in h.tlsa:
            w(f"        {r.usage} {r.selector} {r.mtype} {r.data.hex()}  {'usable' if r.usable else 'unusable'}\n")
        w(f"      MTA-STS pattern match: {'yes' if h.sts_match else 'no'}; "
          f"REQUIRETLS candidate: {'yes' if h in cands else 'no'}; "
          f"usable: {'yes' if h.usable else 'no — ' + h.problem}\n")
        if probes is not None and h.name in probes:
            w(f"      probe: {_probe_text(probes[h.name])}\n")
    if dest.sts is None:
        w(f"MTA-STS: {'unknown: ' + dest.sts_error if dest.sts_error else 'not checked'}\n")
    else:
        s = dest.sts
        if s.policy is None:
            w(f"MTA-STS: no policy ({s.status.value}{': ' + s.detail if s.detail else ''})\n")
        else:
            p = s.policy
            w(f"MTA-STS: mode {p.mode.value}, id {p.policy_id}, max_age {p.max_age}, mx {', '.join(p.mx) or '-'}"
              f" ({s.status.value}{': ' + s.detail if s.detail else ''})\n")
    w(f"TLS policy demanded: {dest.requirement.value} — {dest.reason}\n")
    w(verdict_line(verdict) + "\n")


def _probe_text(r: SessionResult) -> str:
    if not r.connected:
        return f"no connection ({r.error})"
    if not r.starttls:
        return f"connected to {r.address}, {r.error or r.verify_error or 'no STARTTLS'}"
    cert = "verified" if r.verified else f"NOT verified ({r.verify_error})"
    names = r.certificate.get("names", "")
    return (f"{r.address}:{r.port} STARTTLS {r.tls_version} {r.cipher}; certificate {r.verification} {cert}"
            f"{' [' + names + ']' if names else ''}; REQUIRETLS {'advertised' if r.requiretls else 'NOT advertised'}")


def as_json(dest: Destination, probes: dict[str, SessionResult] | None, verdict: Verdict) -> dict[str, Any]:
    d = dest.to_dict()
    names = {h.name for h in candidates(dest)}
    for h in d["hosts"]:
        h["requiretls_candidate"] = h["name"] in names
        if probes is not None and h["name"] in probes:
            h["probe"] = probes[h["name"]].to_dict()
    d["verdict"] = {
        "possible": verdict.deliverable,
        "outcome": verdict.outcome.value,
        "reason": verdict.reason,
        "mx": verdict.mx,
        "status": verdict.dsn,
        "probed": verdict.probed,
        "line": verdict_line(verdict),
    }
    return d


class UntrustedResolver(Exception):
    """The resolver answered the check query without the AD bit: it does not validate DNSSEC."""


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        dest, probes = asyncio.run(_check(args))
    except UntrustedResolver as e:
        print(f"requiretls check: WARNING: {e}.\n  Without a validating resolver every answer counts as insecure: "
              "DANE is never used and no MX counts as DNSSEC-validated, so REQUIRETLS mail would bounce and DANE "
              "destinations fall back.\n  Point --resolver (dns.resolver) at a DNSSEC-validating resolver on a "
              "trusted path.", file=sys.stderr)
        return EXIT_LOOKUP_ERROR
    except ValueError as e:
        print(f"requiretls check: {e}", file=sys.stderr)
        return EXIT_LOOKUP_ERROR
    except DestError as e:
        print(f"requiretls check: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_LOOKUP_ERROR
    verdict = judge(dest, None if probes is None else tuple(probes.values()))
    if args.json:
        json.dump(as_json(dest, probes, verdict), out, indent=2)
        out.write("\n")
    else:
        render_text(dest, probes, verdict, out)
    return EXIT_CODE[verdict.outcome]
