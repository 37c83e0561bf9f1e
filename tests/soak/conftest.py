"""Fault injection (issue 9): ``make soak`` (RTLS_SOAK=1).  Skipped in a plain ``pytest`` run: it takes minutes."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: fault injection through real Postfix with the plugin (make soak)")
