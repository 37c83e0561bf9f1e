"""``requiretls queue``, ``requiretls notify`` and ``requiretls release``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from requiretls.config import Settings, load
from requiretls.log import setup
from requiretls.notify.notifier import NoticeText, NotifyState, run_once, smtp_sender
from requiretls.notify.queue import format_text
from requiretls.notify.release import Journal, ReleaseError, ReleaseRefused, release
from requiretls.notify.scan import agent_addresses, postfix_facts, scan, tools_for
from requiretls.notify.tools import QueueToolError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="requiretls config file (default: built-in defaults)")


def add_queue_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--json", action="store_true", help="print one JSON array")


def run_queue(args: argparse.Namespace) -> int:
    settings = load(args.config)
    tools = tools_for(settings)
    try:
        facts = postfix_facts(tools)
        entries = scan(settings, tools, facts.queue_directory, frozenset({"deferred", "active", "hold"}))
    except (QueueToolError, ValueError) as e:
        print(f"requiretls queue: {e}", file=sys.stderr)
        return 2
    now = time.time()
    if args.json:
        print(json.dumps([e.to_json(now) for e in entries], indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(format_text(entries, now))
    return 0


def add_notify_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--dry-run", action="store_true", help="say who would be told; send nothing, record nothing")


def _notice_text(settings: Settings, myhostname: str) -> NoticeText:
    return NoticeText(settings.local_policy.optout_cookie, myhostname, settings.notify.from_)


def run_notify(args: argparse.Namespace) -> int:
    settings = load(args.config)
    setup("notify", settings.log.target, settings.log.level)
    tools = tools_for(settings)
    n = settings.notify
    try:
        facts = postfix_facts(tools)
        entries = scan(settings, tools, facts.queue_directory)
        state = NotifyState(n.state_dir)
        with state.locked():
            result = run_once(entries, state, delay=n.delay, local_domains=n.sender_domains or facts.local_domains,
                              notify_authenticated=n.notify_authenticated,
                              text=_notice_text(settings, facts.myhostname),
                              send=smtp_sender(settings.relay.reinject), dry_run=args.dry_run)
    except (QueueToolError, ValueError, RuntimeError) as e:
        print(f"requiretls notify: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for qid in result.notified:
            print(f"{qid}: would notify")
        for qid, why in result.skipped:
            print(f"{qid}: {why}")
    return 0


def add_release_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("queue_id", metavar="QUEUEID")
    p.add_argument("--optout", action="store_true", required=True,
                   help="re-submit the message with TLS-Required: No (the only kind of release)")
    p.add_argument("--force", action="store_true",
                   help="submit again after a run that was interrupted while submitting (check the log first)")


def run_release(args: argparse.Namespace) -> int:
    settings = load(args.config)
    setup("release", settings.log.target, settings.log.level)
    tools = tools_for(settings)
    try:
        facts = postfix_facts(tools)
        result = release(args.queue_id, tools=tools, policy=settings.local_policy,
                         journal=Journal(settings.notify.state_dir), reinject=settings.relay.reinject,
                         agents=agent_addresses(settings.relay.listen, facts.queue_directory), force=args.force)
    except ReleaseRefused as e:
        print(f"requiretls release: refused: {e}", file=sys.stderr)
        return 1
    except (ReleaseError, QueueToolError, ValueError) as e:
        print(f"requiretls release: {e}", file=sys.stderr)
        return 2
    print(f"{result.old}: released with TLS-Required: No as {result.new or '(queue id not reported)'} "
          f"for {', '.join(result.recipients)}; original removed")
    return 0


#: name -> (help, add_arguments, run), registered by requiretls.cli
COMMANDS = {
    "queue": ("list messages deferred because of TLS policy, and whether their senders may opt out",
              add_queue_arguments, run_queue),
    "notify": ("tell local and authenticated senders, once, that TLS policy holds their mail (timer)",
               add_notify_arguments, run_notify),
    "release": ("re-submit a TLS-deferred message with TLS-Required: No and remove the original",
                add_release_arguments, run_release),
}
