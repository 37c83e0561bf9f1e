"""The compatibility matrix: each site test records one result per check and Postfix version; at the end of a
session that ran any of them, ``docs/compatibility.md`` is rewritten from what this run saw (with the date and
the versions of every component), so the committed file is what the last run produced."""

from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "compatibility.md"
VERSIONS = ("3.7", "3.10", "3.11")


@dataclass
class Result:
    ok: bool | None  # None: not applicable on this version
    detail: str = ""


@dataclass
class Matrix:
    checks: dict[str, str] = field(default_factory=dict)  # key -> description, in order of first use
    results: dict[tuple[str, str], Result] = field(default_factory=dict)  # (check, version) -> result
    postfix: dict[str, str] = field(default_factory=dict)  # version -> full version
    components: dict[str, str] = field(default_factory=dict)

    def record(self, version: str, key: str, description: str, ok: bool | None, detail: str = "") -> None:
        self.checks.setdefault(key, description)
        self.results[(key, version)] = Result(ok, detail)

    def failures(self, version: str) -> list[str]:
        return [f"{k}: {self.checks[k]} ({r.detail})" for (k, v), r in self.results.items()
                if v == version and r.ok is False]

    def render(self) -> str:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        lines = [
            "# Compatibility matrix",
            "",
            "Written by the compatibility suite (`tests/compat/`, part of `make test`; run it alone with",
            "`pytest tests/compat`). Do not edit: every run that includes it rewrites this file from what it saw.",
            "",
            f"Last run: {now} on {platform.node() or 'the build host'}.",
            "",
            "Components (Debian packages on the host; the Postfix 3.10 and 3.11 instances run in chroots and use",
            "the same host daemons over loopback):",
            "",
        ]
        for v in VERSIONS:
            lines.append(f"* Postfix {v}: {self.postfix.get(v, 'not run')}")
        for name, ver in self.components.items():
            lines.append(f"* {name}: {ver}")
        lines += [
            "",
            "One site per Postfix version, configured the way an admin would before `requiretls postfix-config",
            "--apply`: amavisd-new as `content_filter` (do-nothing policy) with its return smtpd, opendkim as the",
            "signing milter in `smtpd_milters`, `non_smtpd_milters = $smtpd_milters`, postscreen on the smtp port,",
            "local mailboxes through Dovecot LMTP (`mailbox_transport`), a sender-dependent relayhost with SASL",
            "client authentication, and `smtp_tls_policy_maps` from postfix-mta-sts-resolver. Then every message",
            "class is sent once. `yes`: checked and held; `NO`: checked and failed; `n/a`: does not apply to that",
            "version; `not run`: this run did not include that version. Details in docs/operations.md,",
            '"Living with other software".',
            "",
            "| check | " + " | ".join(f"Postfix {v}" for v in VERSIONS) + " |",
            "|---|" + "---|" * len(VERSIONS),
        ]
        for key, desc in self.checks.items():
            cells = []
            for v in VERSIONS:
                r = self.results.get((key, v))
                if r is None:
                    cells.append("not run" if v not in self.postfix else "–")
                elif r.ok is None:
                    cells.append("n/a" + (f" ({r.detail})" if r.detail else ""))
                else:
                    cells.append("yes" if r.ok else f"NO ({r.detail})")
            lines.append(f"| {desc} | " + " | ".join(cells) + " |")
        lines.append("")
        return "\n".join(lines)

    def write(self) -> None:
        if self.results:
            DOC.write_text(self.render())


MATRIX = Matrix()
