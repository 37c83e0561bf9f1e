"""Postfix-style logging: one line per event, ``QUEUEID: key=value, key=value``, to stderr or syslog (mail)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys

#: A value with one of these is quoted.
_QUOTE = re.compile(r'[, ="]').search


def setup(component: str, target: str = "stderr", level: str = "info") -> logging.Logger:
    """Configure the ``requiretls`` logger for one daemon (``milter``, ``policyd``, ``relay``)."""
    logger = logging.getLogger("requiretls")
    logger.handlers.clear()
    logger.setLevel(level.upper())
    logger.propagate = False
    handler: logging.Handler
    if target == "syslog" and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log", logging.handlers.SysLogHandler.LOG_MAIL)
        handler.setFormatter(logging.Formatter(f"requiretls/{component}[%(process)d]: %(message)s"))
    elif os.environ.get("JOURNAL_STREAM"):
        # Under systemd the journal adds time, identifier and pid itself (SyslogIdentifier in the unit).
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s requiretls/{component}[%(process)d]: %(message)s"))
    logger.addHandler(handler)
    return logger


def kv(**fields: object) -> str:
    """``key=value, key=value`` with values that contain separators quoted, as Postfix logs do."""
    parts = []
    for k, v in fields.items():
        if v is None:
            continue
        s = str(v)
        if not s.isprintable():
            # Hostile bytes (line breaks, controls, bytes that were not UTF-8) must not forge or break a log line.
            s = s.encode("unicode_escape").decode("ascii")
        if s == "" or _QUOTE(s) is not None:
            s = '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{k}={s}")
    return ", ".join(parts)
