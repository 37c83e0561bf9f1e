"""MTA-STS parsing (RFC 8461 sections 3.1 and 3.2): the ``_mta-sts`` TXT record and the policy body.

Pure: text in, frozen values out, no I/O, no clock.  Every malformed input raises
:class:`~requiretls.dest.errors.MtaStsRecordError` or :class:`~requiretls.dest.errors.MtaStsPolicyError`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from requiretls.facts import StsMode, StsPolicy

from ..errors import MtaStsPolicyError, MtaStsRecordError

#: RFC 8461 section 3.2: ``max_age`` is at most 31557600 seconds (about a year).
MAX_AGE_LIMIT = 31557600

_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}")
_EXT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE_RE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_MAX_AGE_RE = re.compile(r"[0-9]{1,10}")
_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class StsRecord:
    """The parsed ``_mta-sts`` TXT record (RFC 8461 section 3.1)."""

    id: str
    extensions: tuple[tuple[str, str], ...] = ()


# --- discovery record -------------------------------------------------------------------


def parse_sts_record(text: str) -> StsRecord:
    """Parse one TXT record (strings already joined), RFC 8461 section 3.1 ABNF."""
    if not text.startswith("v=STSv1"):
        raise MtaStsRecordError(f"not an STSv1 record: {text!r}")
    fields = [f.strip(" \t") for f in text.split(";")]
    if fields[0] != "v=STSv1":
        raise MtaStsRecordError(f"bad version field in {text!r}")
    rest = fields[1:]
    if rest and rest[-1] == "":
        rest = rest[:-1]  # one trailing delimiter is allowed
    record_id: str | None = None
    ext: list[tuple[str, str]] = []
    if not rest:
        raise MtaStsRecordError(f"no id field in {text!r}")
    for f in rest:
        key, sep, value = f.partition("=")
        if not sep or not key:
            raise MtaStsRecordError(f"malformed field {f!r} in {text!r}")
        if key == "id":
            if not _ID_RE.fullmatch(value):
                raise MtaStsRecordError(f"invalid id {value!r} (1-32 letters and digits)")
            if record_id is None:
                record_id = value
        elif _EXT_NAME_RE.fullmatch(key) and _EXT_VALUE_RE.fullmatch(value):
            ext.append((key, value))
        else:
            raise MtaStsRecordError(f"malformed field {f!r} in {text!r}")
    if record_id is None:
        raise MtaStsRecordError(f"no id field in {text!r}")
    return StsRecord(record_id, tuple(ext))


def select_sts_record(texts: Sequence[str]) -> StsRecord:
    """From all TXT records at ``_mta-sts``, keep those starting with ``v=STSv1``;
    exactly one must remain and be valid (RFC 8461 section 3.1)."""
    candidates = [t for t in texts if t.startswith("v=STSv1")]
    if not candidates:
        raise MtaStsRecordError("no v=STSv1 TXT record")
    if len(candidates) > 1:
        raise MtaStsRecordError(f"{len(candidates)} v=STSv1 TXT records; exactly one is allowed")
    return parse_sts_record(candidates[0])


# --- policy body --------------------------------------------------------------------------


def valid_mx_pattern(pattern: str) -> bool:
    """``["*."] Domain`` in A-label form; the wildcard only as the whole left-most label."""
    host = pattern[2:] if pattern.startswith("*.") else pattern
    if not host or len(host) > 253 or "*" in host:
        return False
    labels = host.split(".")
    return len(labels) >= 1 and all(_LABEL_RE.fullmatch(label) for label in labels)


def parse_policy(text: str, max_age_limit: int = MAX_AGE_LIMIT) -> StsPolicy:
    """Parse a policy body (RFC 8461 section 3.2).

    Keys are case-sensitive; unknown keys are ignored; for a repeated key other
    than ``mx`` the first one counts; ``max_age`` above the limit is clamped.
    """
    first: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.split("\n"):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line.strip(" \t"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise MtaStsPolicyError(f"line without ':' in policy: {line[:80]!r}")
        key = key.strip(" \t")
        value = value.strip(" \t")
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not valid_mx_pattern(pattern):
                raise MtaStsPolicyError(f"invalid mx pattern {value!r}")
            if pattern not in mx:
                mx.append(pattern)
        elif key not in first:
            first[key] = value
    if first.get("version") != "STSv1":
        raise MtaStsPolicyError(f"version must be STSv1, not {first.get('version')!r}")
    try:
        mode = StsMode(first.get("mode", ""))
    except ValueError:
        raise MtaStsPolicyError(f"invalid mode {first.get('mode')!r}") from None
    age_text = first.get("max_age", "")
    if not _MAX_AGE_RE.fullmatch(age_text):
        raise MtaStsPolicyError(f"invalid max_age {age_text!r}")
    max_age = min(int(age_text), max_age_limit, MAX_AGE_LIMIT)
    if not mx and mode is not StsMode.NONE:
        raise MtaStsPolicyError("no mx pattern in a policy whose mode is not none")
    return StsPolicy(mode, max_age, tuple(mx))
