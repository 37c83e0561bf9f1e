"""The bed as a whole: start/stop of DNS, the MX and HTTPS services, and the Postfix instances.

State lives in one directory (default ``var/testbed`` in the repo, ``RTLS_TESTBED_STATE`` overrides):
``bed.json`` lists the daemons by PID, so ``down`` works from another process than ``up``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import dns as bdns
from . import procs
from .hosts import HTTPS_IP, LAME_IP, MX_HOSTS, NSD_IP, UNBOUND_IP
from .pki import Pki, make_pki
from .postfix import Postfix, PostfixVersion, available_versions
from .postfix import version as postfix_version
from .records import STALL_FILE, MxRecorder, recorder

REPO = Path(__file__).resolve().parents[2]
DEFAULT_STATE = Path(os.environ.get("RTLS_TESTBED_STATE", str(REPO / "var" / "testbed")))
ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REGISTRY = Path("/run/requiretls-testbed.state")
"""Which state dir the machine's running bed uses, and who started it (``up`` or a test session).  The
bed's addresses are machine-wide, so at most one bed runs at a time; the registry lets any process
(another pytest run, ``status``) find and reuse it."""
USERS = Path("/run/requiretls-testbed.users")
"""One file per test session using the bed, named by its slot (1-9): the slot gives the session its own
Postfix instances and ports, and the last session out stops a bed that a test session started."""


def listening_sockets() -> list[str]:
    """``ss -ltnup`` lines for the bed's addresses (127.0.2.x, 127.0.3.1, 127.0.53.x) and Postfix ports."""
    out = subprocess.run(["ss", "-ltnup"], capture_output=True, text=True, timeout=10).stdout
    keep = []
    for line in out.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 5:
            continue
        local = cols[4]
        host, _, port = local.rpartition(":")
        if host.startswith(("127.0.2.", "127.0.3.", "127.0.53.")) or (
            host == "127.0.0.1" and port.isdigit() and 20000 <= int(port) < 30000
        ):
            keep.append(line)
    return keep


@dataclass
class Bed:
    """Handle on a bed state directory; ``start()``/``stop()`` are idempotent-safe and restartable."""

    state: Path = field(default_factory=lambda: DEFAULT_STATE)
    owned: bool = True  # False: someone else started it (``up``); tests must not stop it
    origin: str = "up"  # who started it: "up" (by hand, left running) or "pytest"
    slot: int = 0  # this process's Postfix slot (see USERS); 0 for ``up``/demo

    def __post_init__(self) -> None:
        self.state = Path(self.state).resolve()
        if "/usr/sbin" not in os.environ.get("PATH", "").split(":"):
            os.environ["PATH"] = ENV_PATH + ":" + os.environ.get("PATH", "")
        self.dns_files = bdns.DnsFiles(self.state / "dns")
        self.dns = bdns.Resolver(self.dns_files)
        self.pki = Pki(self.state / "pki")
        self._postfix: dict[str, Postfix] = {}

    # --- state file ---------------------------------------------------------------------------------

    @property
    def _state_file(self) -> Path:
        return self.state / "bed.json"

    def _procs(self) -> list[procs.Proc]:
        if not self._state_file.exists():
            return []
        return [procs.Proc(**p) for p in json.loads(self._state_file.read_text())["procs"]]

    @property
    def running(self) -> bool:
        ps = self._procs()
        return bool(ps) and all(procs.alive(p) for p in ps)

    @classmethod
    def current(cls) -> Bed | None:
        """The bed running on this machine (whoever started it), or None."""
        try:
            reg = json.loads(REGISTRY.read_text())
        except (OSError, ValueError):
            return None
        b = cls(Path(reg["state"]), owned=False, origin=reg.get("origin", "up"))
        return b if b.running else None

    # --- sharing between concurrent test sessions ------------------------------------------------

    @staticmethod
    def _live_users() -> dict[int, procs.Proc]:
        users: dict[int, procs.Proc] = {}
        for f in USERS.glob("*") if USERS.is_dir() else []:
            try:
                p = procs.Proc(**json.loads(f.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if procs.alive(p):
                users[int(f.name)] = p
            else:
                f.unlink(missing_ok=True)
        return users

    def acquire(self) -> int:
        """Register this process as a user of the bed; take the lowest free Postfix slot (1-9)."""
        USERS.mkdir(exist_ok=True)
        me = procs.adopt("user", os.getpid(), "")
        for slot in range(1, 10):
            try:
                with open(USERS / str(slot), "x") as f:
                    f.write(json.dumps(me.__dict__))
            except FileExistsError:
                if slot in self._live_users():
                    continue
                (USERS / str(slot)).unlink(missing_ok=True)
                return self.acquire()
            self.slot = slot
            self._postfix.clear()
            return slot
        raise RuntimeError("more than 9 test sessions share the bed")

    def release(self) -> bool:
        """Unregister; True if no other session still uses the bed."""
        if self.slot:
            (USERS / str(self.slot)).unlink(missing_ok=True)
        return not self._live_users()

    def other_users(self) -> list[int]:
        return [s for s in self._live_users() if s != self.slot]

    # --- life cycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = 20.0, origin: str | None = None) -> None:
        """Fresh CA, freshly signed zones, then NSD, the lame NSD, Unbound and the services process."""
        if any(procs.alive(p) for p in self._procs()):
            raise RuntimeError(f"bed already running in {self.state} (python -m tests.testbed down)")
        other = Bed.current()
        if other is not None:
            raise RuntimeError(f"bed addresses already in use by the bed in {other.state}")
        busy = [s for s in listening_sockets() if "127.0.0.1:" not in s.split()[4]]
        if busy:
            raise RuntimeError("bed addresses already in use:\n" + "\n".join(busy))
        self.state.mkdir(parents=True, exist_ok=True)
        self.state.chmod(0o755)
        for parent in self.state.parents:
            if not parent.stat().st_mode & 0o001:
                raise RuntimeError(
                    f"{parent} is not searchable by other users: Postfix (running as 'postfix') could not "
                    f"reach its data directory under {self.state}; choose another RTLS_TESTBED_STATE"
                )
        for sub in ("pki", "dns", "mx", "https", "logs"):
            shutil.rmtree(self.state / sub, ignore_errors=True)
        (self.state / "services.ready").unlink(missing_ok=True)
        make_pki(self.state / "pki")
        origins = bdns.build_zones(self.dns_files, self.pki)
        bdns.write_configs(self.dns_files, origins)
        for m in MX_HOSTS:
            (self.state / "mx" / m.key).mkdir(parents=True, exist_ok=True)
        logs = self.state / "logs"
        started: list[procs.Proc] = []

        def save() -> None:
            self._state_file.write_text(
                json.dumps({"started_at": time.time(), "procs": [p.__dict__ for p in started]}, indent=1)
            )

        try:
            d = self.dns_files
            started.append(
                procs.spawn("nsd", ["nsd", "-d", "-c", str(d.nsd_conf)], logs / "nsd.out", str(d.nsd_conf))
            )
            started.append(
                procs.spawn(
                    "nsd-lame", ["nsd", "-d", "-c", str(d.lame_conf)], logs / "nsd-lame.out", str(d.lame_conf)
                )
            )
            started.append(
                procs.spawn(
                    "unbound",
                    ["unbound", "-d", "-c", str(d.unbound_conf)],
                    logs / "unbound.out",
                    str(d.unbound_conf),
                )
            )
            env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            started.append(
                procs.spawn(
                    "services",
                    [sys.executable, "-m", "tests.testbed.services", str(self.state)],
                    logs / "services.out",
                    f"tests.testbed.services {self.state}",
                    env=env,
                )
            )
            save()
            for p, host in ((started[0], NSD_IP), (started[1], LAME_IP), (started[2], UNBOUND_IP)):
                procs.wait_tcp(host, 53, timeout, p, logs / f"{p.name}.out")
            end = time.monotonic() + timeout
            while not (self.state / "services.ready").exists():
                if not procs.alive(started[3]) or time.monotonic() > end:
                    raise RuntimeError(
                        "services did not start:\n" + (logs / "services.out").read_text()[-3000:]
                    )
                time.sleep(0.05)
            bdns.wait_ready(timeout)
            self.origin = origin or self.origin
            REGISTRY.write_text(json.dumps({"state": str(self.state), "origin": self.origin}) + "\n")
        except BaseException:
            self._stop_procs(started)
            self._state_file.unlink(missing_ok=True)
            raise

    def _stop_procs(self, ps: list[procs.Proc]) -> None:
        for p in reversed(ps):
            procs.stop(p)

    def stop(self) -> None:
        """Stop every Postfix instance of this state dir, then the bed's daemons; wait until all ports close.

        Keeps going past a failing part so that one stuck piece does not leave the rest running; the state
        file is removed only once every recorded daemon is gone.
        """
        errors: list[str] = []
        for pf in self.postfix_instances():
            try:
                pf.stop()
            except Exception as e:
                errors.append(f"postfix {pf.version}: {e}")
        ps = self._procs()
        self._stop_procs(ps)
        if any(procs.alive(p) for p in ps):
            errors.append("still alive: " + ", ".join(f"{p.name}[{p.pid}]" for p in ps if procs.alive(p)))
        else:
            self._state_file.unlink(missing_ok=True)
            try:
                if Path(json.loads(REGISTRY.read_text())["state"]) == self.state:
                    REGISTRY.unlink()
            except (OSError, ValueError, KeyError):
                pass
        (self.state / "services.ready").unlink(missing_ok=True)
        try:
            for m in MX_HOSTS:
                procs.wait_closed(m.ip, 25)
            for ip, port in ((HTTPS_IP, 443), (NSD_IP, 53), (UNBOUND_IP, 53), (LAME_IP, 53)):
                procs.wait_closed(ip, port)
        except TimeoutError as e:
            errors.append(str(e))
        if errors:
            raise RuntimeError("bed did not stop cleanly: " + "; ".join(errors))

    # --- parts --------------------------------------------------------------------------------------

    def mx(self, key: str) -> MxRecorder:
        """What MX ``key`` (see hosts.MX_HOSTS, e.g. "dane") received."""
        return recorder(self.state, key)

    def set_sts_stall(self, domain: str, on: bool) -> None:
        """Switch the MTA-STS stall fault for ``domain``: its policy host accepts the HTTPS request and sends
        nothing back (a fetch times out) until switched off, then answers as usual."""
        path = self.state / "https" / STALL_FILE
        domains = set(path.read_text().split()) if path.exists() else set()
        domains = domains | {domain} if on else domains - {domain}
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{d}\n" for d in sorted(domains)))
        os.replace(tmp, path)

    @contextmanager
    def sts_stall(self, domain: str) -> Iterator[None]:
        self.set_sts_stall(domain, True)
        try:
            yield
        finally:
            self.set_sts_stall(domain, False)

    def clear_mx(self) -> None:
        for m in MX_HOSTS:
            self.mx(m.key).clear()

    def postfix(self, version: str | PostfixVersion = "3.7") -> Postfix:
        """The (single) Postfix instance of that version in this bed; not started."""
        pv = version if isinstance(version, PostfixVersion) else postfix_version(version)
        if pv.version not in self._postfix:
            self._postfix[pv.version] = Postfix(self.state, pv, slot=self.slot)
        return self._postfix[pv.version]

    def postfix_instances(self) -> list[Postfix]:
        """Every instance with a pid file here (any slot), including ones started by another process."""
        out = []
        for pv in available_versions(["3.7", "3.10", "3.11"]):
            for slot in range(10):
                pf = Postfix(self.state, pv, slot=slot)
                if (pf.dir / "instance.json").exists():
                    out.append(pf)
        return out

    def status(self) -> dict[str, object]:
        return {
            "state": str(self.state),
            "procs": {p.name: {"pid": p.pid, "alive": procs.alive(p)} for p in self._procs()},
            "postfix": {
                f"{pf.version}/slot{pf.slot}": {"running": pf.running, "ports": pf.ports.__dict__}
                for pf in self.postfix_instances()
            },
            "test_sessions": {slot: p.pid for slot, p in self._live_users().items()},
            "listening": listening_sockets(),
        }
