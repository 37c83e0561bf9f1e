"""Small pieces the benchmark scripts share: a load spread over threads, a process's CPU time."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path


def parallel(n: int, work: Callable[[], None], what: str = "clients") -> float:
    """Run ``work`` in ``n`` threads at once; the wall time until all are done.  A failure in any raises
    RuntimeError after all have ended (with the first three errors)."""
    errors: list[str] = []

    def run() -> None:
        try:
            work()
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=run) for _ in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} {what} failed: {errors[:3]}")
    return took


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
