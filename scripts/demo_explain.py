#!/usr/bin/env python3
"""Run `requiretls explain` over the sample messages in examples/ and print a table of decisions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")


def explain(s: dict[str, object]) -> dict[str, object]:
    cmd = [sys.executable, "-m", "requiretls", "explain", "--json", "--config",
           os.path.join(EXAMPLES, "requiretls.toml"), "--sender", str(s["sender"])]
    for r in s["rcpt"]:  # type: ignore[attr-defined]
        cmd += ["--rcpt", r]
    for p in s.get("esmtp", []):  # type: ignore[attr-defined]
        cmd += ["--esmtp", p]
    for d in s.get("impossible", []):  # type: ignore[attr-defined]
        cmd += ["--impossible", d]
    if s.get("sasl_user"):
        cmd += ["--sasl-user", str(s["sasl_user"])]
    if s.get("client_ip"):
        cmd += ["--client-ip", str(s["client_ip"])]
    cmd.append(os.path.join(EXAMPLES, "messages", str(s["message"])))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def main() -> int:
    with open(os.path.join(EXAMPLES, "scenarios.toml"), "rb") as f:
        scenarios = tomllib.load(f)["scenario"]
    rows = [("scenario", "class", "per recipient", "edits", "reason")]
    for s in scenarios:
        d = explain(s)
        per = ", ".join(f"{a.split('@')[1]}={v['class']}" for a, v in d["recipients"].items())  # type: ignore[union-attr]
        edits = "; ".join(
            f"{e['action']} {e['name']}" + (f": {e['value']}" if e["action"] != "delete" else "")
            for e in d["header_edits"]  # type: ignore[union-attr]
        )
        if d.get("envelope_params"):
            edits = (edits + "; " if edits else "") + "MAIL FROM " + " ".join(d["envelope_params"])  # type: ignore[arg-type]
        reasons = list(d["reasons"])  # type: ignore[call-overload]
        # For the normal policy the interesting reason is why a signal was ignored, which comes after the summary.
        why = reasons[-1] if d["class"] == "default" else reasons[0]
        rows.append((str(s["name"]), str(d["class"]), per, edits or "-", str(why)))
    widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in enumerate((36, 10, 44, 60, 200))]
    for n, r in enumerate(rows):
        print("  ".join(c[:w].ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\n{len(scenarios)} sample messages explained with examples/requiretls.toml "
          "(try: requiretls explain --help)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
