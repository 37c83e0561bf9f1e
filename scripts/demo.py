#!/usr/bin/env python3
"""``make demo``: the plugin end to end on a real Postfix in the testbed.

Brings the bed up (signed DNS, test CA, MX servers), wires the plugin into a Postfix instance with
``requiretls postfix-config --apply``, starts the milter, the delivery agent and policyd, sends a few messages
and prints where each went and how (what the receiving MX recorded, the plugin's log lines), then tears
everything down.  ``--postfix 3.11`` (or 3.10) uses the debootstrap chroots (``make chroots``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.plugin import Plugin, running_bed  # noqa: E402
from tests.testbed.bed import Bed  # noqa: E402

SENDER = "alice@sender.test"
CASES = [
    ("TLS-Required: No to a DANE domain whose MX has no STARTTLS", "dane-nostarttls", "bob@dane-nostarttls.test",
     {"TLS-Required": "No"}),
    ("REQUIRETLS by local rule to a DANE + REQUIRETLS domain", "dane", "bob@dane.test", {}),
    ("REQUIRETLS by local rule to an MX without REQUIRETLS", "dane-norequiretls", "bob@dane-norequiretls.test", {}),
    ("REQUIRETLS by local rule to an unsigned MX without MTA-STS", "insecure", "bob@insecure.test", {}),
    ("ordinary message to an MTA-STS domain (policyd's default zone)", "sts", "bob@sts.test", {}),
    ("ordinary message to an MTA-STS domain whose MX certificate expired", "expired", "bob@expired.test", {}),
]


def _wait_outcome(plugin: Plugin, qid: str, rcpt: str, timeout: float = 30) -> str:
    end = time.monotonic() + timeout
    rx = re.compile(rf"{qid}: to=<{re.escape(rcpt)}>.*status=(\w+)")
    while time.monotonic() < end:
        m = rx.search(plugin.pf.log())
        if m:
            line = m.group(0)
            dsn = re.search(r"dsn=([\d.]+)", line)
            return f"{m.group(1)} (dsn={dsn.group(1) if dsn else '?'})"
        time.sleep(0.2)
    return "no outcome logged yet"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--postfix", default="3.7", help="Postfix version: 3.7 (host), 3.10 or 3.11 (chroots)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("make demo needs root (the bed uses ports 25/53/443 on loopback)", file=sys.stderr)
        return 2
    with running_bed() as bed:
        return run(bed, args)


def run(bed: Bed, args: argparse.Namespace) -> int:
    pf = bed.postfix(args.postfix)
    plugin = Plugin(bed, pf, table="".join(f"{d} requiretls=yes\n" for d in
                                           ("dane.test", "dane-norequiretls.test", "insecure.test")),
                    apply_args=("--policyd",))
    try:
        if pf.running:
            pf.stop()
        pf.reset()
        bed.clear_mx()
        plugin.start(daemons=("milter", "relay", "policyd"))
        print(f"Postfix {pf.pv.full_version} with the plugin (requiretls postfix-config --apply --policyd), "
              "milter + delivery agent + policyd running\n")
        print("policy table:\n  " + plugin.table.strip().replace("\n", "\n  ") + "\n")
        for title, key, rcpt, headers in CASES:
            q = pf.submit(SENDER, [rcpt], headers=headers or None)
            outcome = _wait_outcome(plugin, q.queue_id, rcpt)
            got = bed.mx(key).deliveries()
            print(f"* {title}\n  {rcpt}: Postfix says {outcome}")
            if got:
                d = got[-1]
                print(f"  MX {key} received it: TLS={d.tls_version or 'no'}, MAIL FROM params="
                      f"{' '.join(d.mail_options) or '-'}")
            else:
                print(f"  MX {key} received nothing")
            for name in ("milter", "relay"):
                for line in plugin.log(name).splitlines():
                    if q.queue_id in line:
                        print(f"  {name}: {line.split(': ', 1)[1][:220]}")
            print()
        dsns = [d for d in bed.mx("sender").deliveries() if d.mail_from in ("", "<>")]
        print(f"bounces returned to {SENDER}: {len(dsns)} (headers only, RFC 8689 section 5)")
        return 0
    finally:
        plugin.stop()
        if pf.running:
            pf.stop()


if __name__ == "__main__":
    sys.exit(main())
