"""Fuzz tests (issue 9): every parser that reads outside input, over generated input.

``make test`` runs each target briefly (``RTLS_FUZZ_EXAMPLES`` unset: a few dozen cases); ``make fuzz`` sets
``RTLS_FUZZ_EXAMPLES=100000`` (the ``fuzz`` profile) and then runs the atheris harnesses in ``atheris_*.py``.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuzz: generated-input test of a parser that reads outside input")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/fuzz/" in str(item.fspath):
            item.add_marker(pytest.mark.fuzz)
