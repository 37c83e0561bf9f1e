"""The boundary to Postfix's queue tools: ``postqueue -j``, ``postcat``, ``postsuper``, ``postconf``.

Everything the opt-out loop knows of the queue comes through :class:`PostfixTools`, so that unit tests can
replace it with a fake and the e2e tests run it against a real queue.  ``prefix`` is prepended to every command
(for a Postfix in a container or chroot, e.g. ``["chroot", "/srv/mta"]``); ``config_dir`` is passed as ``-c``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass


class QueueToolError(Exception):
    """A Postfix queue tool failed or is missing."""


@dataclass(frozen=True, slots=True)
class PostfixTools:
    config_dir: str | None = None
    prefix: tuple[str, ...] = ()
    timeout: float = 60.0

    def _run(self, tool: str, args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
        cmd = [*self.prefix, tool]
        if self.config_dir:
            cmd += ["-c", self.config_dir]
        cmd += list(args)
        try:
            r = subprocess.run(cmd, capture_output=True, timeout=self.timeout, check=False)
        except FileNotFoundError as e:
            raise QueueToolError(f"{tool} not found: is Postfix installed?") from e
        except subprocess.TimeoutExpired as e:
            raise QueueToolError(f"{' '.join(cmd)}: no answer after {self.timeout:g} s") from e
        if check and r.returncode != 0:
            err = r.stderr.decode(errors="replace").strip()
            raise QueueToolError(f"{' '.join(cmd)} failed (exit {r.returncode}): {err}")
        return r

    def postqueue_json(self) -> str:
        """``postqueue -j``: one JSON object per line, one line per queued message."""
        return self._run("postqueue", ["-j"]).stdout.decode("utf-8", errors="surrogateescape")

    def postcat_envelope_headers(self, queue_id: str) -> str | None:
        """``postcat -e -h -q ID`` (envelope records and the message header); None when the message is gone."""
        r = self._run("postcat", ["-e", "-h", "-q", queue_id], check=False)
        if r.returncode != 0:
            return None
        return r.stdout.decode("utf-8", errors="surrogateescape")

    def postcat_message(self, queue_id: str) -> bytes | None:
        """``postcat -h -b -q ID``: the message as Postfix holds it (header and body); None when it is gone."""
        r = self._run("postcat", ["-h", "-b", "-q", queue_id], check=False)
        if r.returncode != 0:
            return None
        return r.stdout

    def postsuper(self, *args: str) -> str:
        """``postsuper ARGS`` (``-h ID`` hold, ``-H ID`` release from hold, ``-d ID`` delete); its report."""
        r = self._run("postsuper", args)
        return (r.stdout + r.stderr).decode(errors="replace")

    def postconf(self, *names: str) -> dict[str, str]:
        """``postconf -h``-style values of ``names`` (``postconf NAME...`` parsed)."""
        out = self._run("postconf", list(names)).stdout.decode(errors="replace")
        values: dict[str, str] = {}
        for line in out.splitlines():
            name, eq, value = line.partition("=")
            if eq:
                values[name.strip()] = value.strip()
        return values
