"""The compatibility suite: writes docs/compatibility.md at the end of a session that ran it."""

from __future__ import annotations

import pytest

from tests.compat.matrix import MATRIX


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    MATRIX.write()
