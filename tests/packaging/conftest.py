"""Markers of the packaging tests (registered here: the project's marker list lives in pyproject.toml)."""

from __future__ import annotations

import pytest

from tests.packaging.chroots import Deb, build_deb


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "deb: builds the Debian package and installs it into a clean chroot")


@pytest.fixture(scope="session")
def deb() -> Deb:
    """The package built from this work tree (once per session: test_deb and test_lifecycle share it)."""
    return build_deb()
