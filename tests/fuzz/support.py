"""Hypothesis settings shared by the fuzz tests: short in ``make test``, long in ``make fuzz``."""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("RTLS_FUZZ_EXAMPLES", "0") or 0)

settings.register_profile(
    "fuzz-quick", max_examples=40, deadline=None, database=None, derandomize=False,
    suppress_health_check=list(HealthCheck),
)
# Long runs: a per-case deadline turns a hang (say, regex backtracking) into a failure instead of a stuck job.
settings.register_profile(
    "fuzz", max_examples=max(EXAMPLES, 1), deadline=timedelta(seconds=5), database=None,
    suppress_health_check=list(HealthCheck), print_blob=True,
)
FUZZ = settings.get_profile("fuzz" if EXAMPLES else "fuzz-quick")

# Text that reaches deep into the parsers: grammar tokens mixed with arbitrary characters and separators.
def tokens(words: list[str], *, alphabet: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[str]:
    noise = st.text(alphabet=alphabet, max_size=12) if alphabet is not None else st.text(max_size=12)
    part = st.one_of(st.sampled_from(words), noise)
    return st.lists(part, max_size=24).map("".join)


SEPARATORS = [" ", "  ", "\t", "\n", "\r\n", "\n ", "\r\n\t", ";", ":", "=", ",", "#", "\x00", "\u00a0", "\u2028"]
