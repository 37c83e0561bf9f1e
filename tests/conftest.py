"""Shared fixtures: the testbed (session scoped) and a fresh Postfix instance per test and version.

* ``bed``: the running :class:`tests.testbed.bed.Bed`.  If a bed is already up on this machine
  (``python -m tests.testbed up``, or another test session), the session uses it; otherwise it starts one
  in ``var/testbed`` (or ``RTLS_TESTBED_STATE``).  Test sessions on one machine take turns (a lock in
  /run; a second session waits up to ``RTLS_TESTBED_LOCK_WAIT`` = 900 s), and each gets its own Postfix
  slot (dirs and ports), so a hand-started ``up`` Postfix (slot 0) is never touched.  A bed a session
  started is stopped at its end; a bed started by ``up`` stays up.
* ``postfix``: parametrised over the Postfix versions present (``RTLS_POSTFIX_VERSIONS=3.7,3.11`` restricts
  them); a freshly reset, *not yet started* instance, so the test can add settings first, then
  ``postfix.start()``.  It is stopped afterwards.  MX records and the resolver cache are cleared before.
* ``postfix_version``: the version string alone, for tests that manage instances themselves.

The host's ``/etc/resolv.conf`` is hashed at session start and checked at session end: the bed must never
touch it (its Postfix sees the test resolver through a bind mount in a private namespace).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
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


SESSION_LOCK = Path("/run/requiretls-testbed.session.lock")
SESSION_LOCK_WAIT = float(os.environ.get("RTLS_TESTBED_LOCK_WAIT", "900"))


@contextlib.contextmanager
def _one_session_at_a_time() -> Iterator[None]:
    """Test sessions on one machine take turns with the bed: they share its MX servers and resolver, so
    one session's deliveries, MX clears and SERVFAIL toggles would break another's assertions."""
    with open(SESSION_LOCK, "w") as f:
        end = time.monotonic() + SESSION_LOCK_WAIT
        said = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    pytest.fail(f"another test session held the testbed over {SESSION_LOCK_WAIT:.0f}s")
                if not said:
                    print(f"\nwaiting for another test session to finish with the testbed ({SESSION_LOCK})")
                    said = True
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def bed() -> Iterator[Bed]:
    reason = _bed_unavailable()
    if reason:
        pytest.skip(reason)
    with _one_session_at_a_time():
        b = Bed.current()
        if b is None:
            b = Bed(DEFAULT_STATE)
            b.start(origin="pytest")
        b.acquire()
        try:
            yield b
        finally:
            last = b.release()
            if last and b.origin == "pytest":
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
