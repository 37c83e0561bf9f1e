"""``requiretls.policy`` is pure (architecture, "Components"): importing it loads no DNS, TLS, database,
event-loop or SMTP code, so every adapter can use it and none of that can run inside a decision."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("dns", "ssl", "sqlite3", "asyncio", "smtplib")


def test_importing_the_policy_package_loads_no_io_library() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import requiretls.policy, sys; print(sorted(sys.modules))"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    loaded = set(out.strip().strip("[]").replace("'", "").split(", "))
    assert "requiretls.policy.classify" in loaded  # the pipeline itself is part of the import
    assert sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN) == []
