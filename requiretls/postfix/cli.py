"""``requiretls postfix-config``: print or apply the Postfix configuration right for this Postfix."""

from __future__ import annotations

import argparse
import os
import sys

from requiretls.config import DEFAULT_CONFIG_FILE, load
from requiretls.errors import ConfigError
from requiretls.policy.route import PostfixFeatures
from requiretls.postfix.apply import PostfixError, admin_view, read_env, reconcile, undo
from requiretls.postfix.generate import READ_PARAMS, Plan, PlanError, PostfixEnv, generate, render


def offline_env(version: str | None) -> PostfixEnv:
    """Debian's default layout with nothing of ours or anybody's configured yet."""
    return PostfixEnv(
        PostfixFeatures.from_macro(version or "3.7"),
        "/etc/postfix",
        "/var/spool/postfix",
        {name: "" for name in READ_PARAMS} | {"smtp_tls_security_level": "may"},
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help=f"requiretls config file, the one the daemons read (default: {DEFAULT_CONFIG_FILE}; "
                   "built-in defaults if it does not exist)")
    p.add_argument("-c", "--postfix-config-dir", metavar="DIR", help="Postfix config directory (postconf -c)")
    p.add_argument("--postfix-version", metavar="X.Y", help="steer for this version (default: postconf's)")
    p.add_argument("--apply", action="store_true", help="change the live configuration (postconf -e / -M)")
    p.add_argument("--undo", action="store_true",
                   help="with --apply: take back what requiretls changed (by its journal), keeping later edits")
    p.add_argument("--force", action="store_true",
                   help="with --apply: write our value even where the admin changed it since (a conflict)")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 0 if the live configuration matches, 1 if it drifted (listed), 2 on "
                   "error")
    p.add_argument("--tables", action="store_true",
                   help="rewrite only the generated tables (after a policy table change), then: postfix reload")
    p.add_argument(
        "--policyd",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wire in the policy service (smtp_tls_policy_maps, relaxed zone; 3.11: smtp_requiretls_policy); "
        "default: on for Postfix 3.11+, which needs it to authenticate MTA-STS destinations",
    )
    p.add_argument("--filter-return", metavar="SERVICE/TYPE",
                   help="with a content filter: the master.cf service at which it hands mail back (default: the one "
                   "smtpd service with -o content_filter=)")
    p.add_argument("--front", action="store_true",
                   help="(Postfix 3.7-3.10) move the public smtpd (or postscreen) behind the SMTP front, to "
                   "front.backend; then start requiretls-front.service")
    p.add_argument("--front-service", metavar="SERVICE/TYPE", default="smtp/inet",
                   help="with --front: the master.cf service the front takes the place of (default: smtp/inet)")
    p.add_argument(
        "--offline",
        action="store_true",
        help="do not ask postconf: assume Debian's layout and no existing milters or header_checks",
    )


def _settings_file(arg: str | None) -> str | None:
    if arg is not None:
        return arg or None
    if os.path.exists(DEFAULT_CONFIG_FILE):
        return DEFAULT_CONFIG_FILE
    print(f"requiretls: {DEFAULT_CONFIG_FILE} does not exist: using the built-in defaults", file=sys.stderr)
    return None


def run(args: argparse.Namespace) -> int:
    if args.undo and not args.apply:
        print("requiretls: --undo goes with --apply", file=sys.stderr)
        return 2
    if args.offline and (args.apply or args.check or args.tables):
        print("requiretls: --offline only prints; --apply, --check and --tables need the live configuration",
              file=sys.stderr)
        return 2
    try:
        settings = load(_settings_file(args.config))
    except (ConfigError, OSError) as e:
        if not args.undo:
            print(f"requiretls: {e}", file=sys.stderr)
            return 2
        print(f"requiretls: {e} (ignored: --undo goes by the journal)", file=sys.stderr)
        settings = load(None)
    try:
        env = offline_env(args.postfix_version) if args.offline else admin_view(
            read_env(args.postfix_config_dir, args.postfix_version))
        use_policyd = env.version.native_requiretls if args.policyd is None else args.policyd
        try:
            plan = generate(
                env,
                settings.local_policy,
                settings.milter.socket,
                settings.relay.listen,
                str(settings.relay.reinject),
                settings.policyd.listen[0] if use_policyd else None,
                args.filter_return,
                str(settings.relay.reinject_local),
                str(settings.front.backend) if args.front else None,
                args.front_service,
            )
        except PlanError:
            if not args.undo:
                raise
            plan = Plan((), (), ())  # --undo goes by the journal

        if args.check:
            out = reconcile(plan, env, dry_run=True)
            for line in out.done:
                print(f"drift: {line}")
            for line in out.conflicts:
                print(f"drift (conflict): {line}")
            if not out.done and not out.conflicts:
                print("in sync")
            return 1 if out.done or out.conflicts else 0
        if not (args.apply or args.tables):
            sys.stdout.write(render(plan, env))
            return 0
        out = undo(plan, env) if args.undo else reconcile(plan, env, force=args.force, tables_only=args.tables)
    except (PostfixError, PlanError) as e:
        print(f"requiretls: {e}", file=sys.stderr)
        return 2
    for line in plan.notes if args.apply and not args.undo else ():
        print(f"note: {line}")
    for line in out.done:
        print(line)
    for line in out.conflicts:
        print(f"kept: {line}", file=sys.stderr)
    if not out.done:
        print("nothing to change")
    else:
        reload = f"postfix -c {env.config_directory} reload" if args.postfix_config_dir else "postfix reload"
        print(f"now run: {reload}")
    return 1 if out.conflicts and not args.undo else 0
