"""``python -m tests.testbed up|down|status`` - run the bed by hand or for ``make demo``.

``up`` leaves the bed (and the Postfix instances asked for) running after the command exits; ``down`` stops
everything recorded in the state dir, from any process.  ``--state`` or ``RTLS_TESTBED_STATE`` choose the
state dir (default ``var/testbed``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .bed import DEFAULT_STATE, Bed
from .hosts import DOMAINS, HTTPS_IP, NSD_IP, UNBOUND_IP, domain_mx_hosts
from .postfix import available_versions


def _print_hosts() -> None:
    print(f"resolver {UNBOUND_IP}:53 (validating), authoritative {NSD_IP}:53, MTA-STS https {HTTPS_IP}:443")
    for d in DOMAINS:
        mxs = ", ".join(f"{m.hostname}={m.ip}" for m in domain_mx_hosts(d)) or "-"
        print(f"  {d.domain:28} {d.dnssec.value:9} {mxs}")


def _demo(a: argparse.Namespace) -> int:
    """One message end to end, for ``make demo``: prints Postfix's log lines for it and what the MX got."""
    from .hosts import DOMAIN_BY_NAME

    bed = Bed.current()
    own = bed is None
    if bed is None:
        bed = Bed(a.state)
        bed.start()
    pf = bed.postfix(a.postfix)
    try:
        pf.stop()
        pf.reset()
        if a.setup:
            print(pf.run_host(["sh", "-c", a.setup]).stdout, end="")
        pf.start()
        headers = dict(h.split(":", 1) for h in a.header)
        q = pf.submit(
            "alice@sender.test",
            [a.to],
            mail_options=a.mail_option,
            starttls=bool(a.mail_option),
            headers={k.strip(): v.strip() for k, v in headers.items()},
        )
        print(f"submitted to Postfix {pf.pv.full_version}: queue id {q.queue_id}")
        status = pf.wait_log(rf"{q.queue_id}: to=<{a.to}>.*status=", timeout=60)
        for line in pf.log().splitlines():
            if q.queue_id in line or "TLS connection established" in line:
                print("  log:", line.split(": ", 1)[-1] if ": " in line else line)
        domain = DOMAIN_BY_NAME.get(a.to.rsplit("@", 1)[1])
        if domain is not None and "status=sent" in status.line:
            for _, key in domain.mx:
                for d in bed.mx(key).deliveries():
                    print(
                        f"  MX {key}: from=<{d.mail_from}> params={' '.join(d.mail_options)} "
                        f"to={','.join(d.rcpt_tos)} tls={d.tls_version or 'none'} "
                        f"cipher={d.tls_cipher or '-'} requiretls={d.requiretls}"
                    )
        return 0 if "status=sent" in status.line else 1
    finally:
        pf.stop()
        if own:
            bed.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.testbed", description=__doc__)
    ap.add_argument("--state", type=Path, default=DEFAULT_STATE, help="state directory (default %(default)s)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the bed and leave it running")
    up.add_argument(
        "--postfix",
        default="3.7",
        help="comma-separated Postfix versions to start too (default 3.7; 'all' = every version present; "
        "'none' = no Postfix)",
    )
    down = sub.add_parser("down", help="stop everything the state dir records")
    down.add_argument(
        "--any", action="store_true", help="stop the machine's running bed, whatever its state dir"
    )
    sub.add_parser("status", help="print what runs (JSON)")
    demo = sub.add_parser(
        "demo", help="bed up, one message through Postfix, show where it went and how, down"
    )
    demo.add_argument("--postfix", default="3.7", help="Postfix version (default %(default)s)")
    demo.add_argument("--to", default="bob@dane.test", help="recipient (default %(default)s)")
    demo.add_argument("--mail-option", action="append", default=[], help="MAIL FROM parameter, repeatable")
    demo.add_argument("--header", action="append", default=[], help="'Name: value' header, repeatable")
    demo.add_argument(
        "--setup",
        help="shell command run on the host against the instance before start (MAIL_CONFIG set), "
        "e.g. 'requiretls postfix-config --apply'",
    )
    a = ap.parse_args(argv)
    bed = Bed(a.state)
    if a.cmd == "up":
        t0 = time.monotonic()
        bed.start()
        print(f"bed up in {time.monotonic() - t0:.2f}s, state {bed.state}")
        _print_hosts()
        if a.postfix == "all":
            versions = [v.version for v in available_versions()]
        elif a.postfix == "none":
            versions = []
        else:
            versions = [v for v in a.postfix.split(",") if v]
        for v in versions:
            t1 = time.monotonic()
            pf = bed.postfix(v)
            pf.reset()
            pf.start()
            print(
                f"Postfix {pf.pv.full_version} up in {time.monotonic() - t1:.2f}s: "
                f"smtp 127.0.0.1:{pf.ports.smtp}, "
                f"submission 127.0.0.1:{pf.ports.submission}, config {pf.config_dir}, log {pf.maillog}"
            )
        return 0
    if a.cmd == "down":
        t0 = time.monotonic()
        current = Bed.current()
        if a.any and current is not None and not bed.running:
            bed = Bed(current.state)
        bed.stop()
        print(f"bed down in {time.monotonic() - t0:.2f}s")
        return 0
    if a.cmd == "demo":
        return _demo(a)
    current = Bed.current()
    json.dump({**bed.status(), "machine_bed": str(current.state) if current else None}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
