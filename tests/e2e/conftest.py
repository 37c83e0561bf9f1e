"""Fixtures of the end-to-end tests: the plugin wired into the testbed Postfix of each version."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.plugin import Plugin
from tests.testbed.bed import Bed
from tests.testbed.postfix import Postfix


@pytest.fixture
def plugin(bed: Bed, postfix: Postfix) -> Iterator[Plugin]:
    """A :class:`Plugin` for this test's Postfix; its daemons are stopped afterwards."""
    p = Plugin(bed, postfix)
    try:
        yield p
    finally:
        p.stop()
