"""Fault injection (issue 9): run by ``make test`` and ``make soak`` (RTLS_SOAK=1), in a pytest session of its own
with -s so that the counts are printed.  Skipped in a plain ``pytest`` run."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: fault injection through real Postfix with the plugin (make soak)")
