"""Markers of the Sendmail tests (registered here: the project's marker list lives in pyproject.toml)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sendmail: needs Debian's sendmail in a debootstrap chroot (cached)")
