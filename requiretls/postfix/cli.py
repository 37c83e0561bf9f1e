"""``requiretls postfix-config``: print or apply the Postfix configuration right for this Postfix."""

from __future__ import annotations

import argparse
import sys

from requiretls.config import load
from requiretls.policy.route import PostfixFeatures
from requiretls.postfix.apply import PostfixError, apply, read_env, undo
from requiretls.postfix.generate import READ_PARAMS, PostfixEnv, generate, render


def offline_env(version: str | None) -> PostfixEnv:
    """Debian's default layout with nothing of ours or anybody's configured yet."""
    return PostfixEnv(
        PostfixFeatures.from_macro(version or "3.7"),
        "/etc/postfix",
        "/var/spool/postfix",
        {name: "" for name in READ_PARAMS} | {"smtp_tls_security_level": "may"},
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="requiretls config file (default: built-in defaults)")
    p.add_argument("-c", "--postfix-config-dir", metavar="DIR", help="Postfix config directory (postconf -c)")
    p.add_argument("--postfix-version", metavar="X.Y", help="steer for this version (default: postconf's)")
    p.add_argument("--apply", action="store_true", help="change the live configuration (postconf -e / -M)")
    p.add_argument("--undo", action="store_true", help="with --apply: restore the configuration from the backup")
    p.add_argument(
        "--policyd",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wire in the policy service (smtp_tls_policy_maps, relaxed zone; 3.11: smtp_requiretls_policy); "
        "default: on for Postfix 3.11+, which needs it to authenticate MTA-STS destinations",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="do not ask postconf: assume Debian's layout and no existing milters or header_checks",
    )


def run(args: argparse.Namespace) -> int:
    if args.undo and not args.apply:
        print("requiretls: --undo goes with --apply", file=sys.stderr)
        return 2
    settings = load(args.config)
    if args.offline and args.apply:
        print("requiretls: --offline only prints; --apply needs the live configuration", file=sys.stderr)
        return 2
    try:
        env = offline_env(args.postfix_version) if args.offline else read_env(args.postfix_config_dir,
                                                                             args.postfix_version)
        use_policyd = env.version.native_requiretls if args.policyd is None else args.policyd
        plan = generate(
            env,
            settings.local_policy,
            settings.milter.socket,
            settings.relay.listen,
            str(settings.relay.reinject),
            settings.policyd.listen[0] if use_policyd else None,
            str(settings.relay.reinject_local),
        )
        if not args.apply:
            sys.stdout.write(render(plan, env))
            return 0
        done = undo(plan, env) if args.undo else apply(plan, env)
    except PostfixError as e:
        print(f"requiretls: {e}", file=sys.stderr)
        return 2
    for line in done:
        print(line)
    reload = f"postfix -c {env.config_directory} reload" if args.postfix_config_dir else "postfix reload"
    print(f"now run: {reload}")
    return 0
