"""Markers of the packaging tests (registered here: the project's marker list lives in pyproject.toml)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "deb: builds the Debian package and installs it into a clean chroot")
