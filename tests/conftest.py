"""Shared fixtures: the testbed (session scoped) and a fresh Postfix instance per test and version.

* ``bed``: the running :class:`tests.testbed.bed.Bed`.  If a bed is already up on this machine
  (``python -m tests.testbed up``, or another test run), the session uses it and leaves it running;
  otherwise it starts one in ``var/testbed`` (or ``RTLS_TESTBED_STATE``) and stops it at the end.
* ``postfix``: parametrised over the Postfix versions present (``RTLS_POSTFIX_VERSIONS=3.7,3.11`` restricts
  them); a freshly reset, *not yet started* instance, so the test can add settings first, then
  ``postfix.start()``.  It is stopped afterwards.  MX records and the resolver cache are cleared before.
* ``postfix_version``: the version string alone, for tests that manage instances themselves.

The host's ``/etc/resolv.conf`` is hashed at session start and checked at session end: the bed must never
touch it (its Postfix sees the test resolver through a bind mount in a private namespace).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed.bed import DEFAULT_STATE, Bed
from tests.testbed.postfix import Postfix, available_versions

HOST_RESOLV = Path("/etc/resolv.conf")


def _resolv_hash() -> str:
    try:
        return hashlib.sha256(HOST_RESOLV.read_bytes()).hexdigest()
    except OSError:
        return "missing"


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_RESOLV_KEY] = _resolv_hash()


_RESOLV_KEY = pytest.StashKey[str]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_RESOLV_KEY, None)
    if before is not None and _resolv_hash() != before:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nERROR: the host's {HOST_RESOLV} changed during the test run")


def host_resolv_hash_at_start(config: pytest.Config) -> str:
    return config.stash[_RESOLV_KEY]


def _bed_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the testbed needs root (ports 25/53/443, namespaces)"
    for tool in ("nsd", "unbound", "unbound-control", "unshare", "nsenter"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"the testbed needs {tool} (scripts/install-apt.sh installs it)"
    return None


@pytest.fixture(scope="session")
def bed() -> Iterator[Bed]:
    reason = _bed_unavailable()
    if reason:
        pytest.skip(reason)
    shared = Bed.current()
    if shared is not None:
        yield shared
        return
    # Not a pytest tmp dir: Postfix opens files in its data directory as the ``postfix`` user, who cannot
    # traverse pytest's 0700 /tmp/pytest-of-root.
    b = Bed(DEFAULT_STATE)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "postfix_version" in metafunc.fixturenames:
        versions = [v.version for v in available_versions()]
        metafunc.parametrize(
            "postfix_version", versions or ["none"], ids=[f"postfix{v}" for v in versions] or ["none"]
        )


@pytest.fixture
def postfix(bed: Bed, postfix_version: str) -> Iterator[Postfix]:
    if postfix_version == "none":
        pytest.skip("no Postfix version available")
    pf = bed.postfix(postfix_version)
    if pf.running:
        pf.stop()
    pf.reset()
    bed.clear_mx()
    bed.dns.flush()
    try:
        yield pf
    finally:
        pf.stop()
