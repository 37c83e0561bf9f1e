"""Read the live Postfix configuration and change it with ``postconf -e`` / ``-X`` / ``-M`` / ``-MX``, reversibly
and incrementally.

Every ``--apply`` plans from the live files (what ``postconf`` reports now) and writes only what differs from
the plan, so a second ``--apply`` changes nothing, and an admin's later edits (``relayhost``, a new
``submission`` service...) are never touched.  What we change is recorded in a journal,
``<config_directory>/requiretls.journal`` (JSON): per main.cf parameter and per master.cf entry, the value
before and the value we set; for the list parameters to which we only add an item (``smtpd_milters``,
``header_checks``...), that item.

* A scalar parameter or master.cf entry of ours that no longer holds the value we set was changed by the
  admin: ``--apply`` keeps the admin's value and reports a conflict (``--force`` writes ours again);
  ``--undo`` keeps it too and says so.
* In a list parameter we own only our item: ``--apply`` puts it back first if needed, ``--undo`` removes it and
  leaves every other item (a milter the admin added since stays).
* A master.cf service that exists but is not ours (a name or listen address we need) stops ``--apply`` before
  anything is written.

``--undo`` restores the value before where the value we set still holds, removes what we added, deletes the
table files we wrote (unless edited since) and the journal.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from requiretls.policy.route import PostfixFeatures
from requiretls.postfix.generate import READ_PARAMS, Plan, PostfixEnv, _split_list, _without_ours

JOURNAL = "requiretls.journal"
#: Where versions before the journal kept a copy of main.cf and master.cf (converted on the next run).
BACKUP_DIR = "requiretls.backup"


class PostfixError(Exception):
    """postconf failed or the Postfix configuration is not usable."""


def postconf(args: Sequence[str], config_dir: str | None) -> str:
    cmd = ["postconf"]
    if config_dir:
        cmd += ["-c", config_dir]
    cmd += list(args)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError as e:
        raise PostfixError("postconf not found: is Postfix installed?") from e
    if r.returncode != 0:
        raise PostfixError(f"{' '.join(cmd)}: {r.stderr.strip() or 'exit ' + str(r.returncode)}")
    return r.stdout


def _explicit(config_dir: str) -> dict[str, str]:
    """main.cf's explicit settings, name -> value, read from the file as ``postconf -n`` would list them, but
    also those this postconf does not know (``smtp_requiretls_policy`` is 3.11's; the postconf run may be
    older than the instance)."""
    out: dict[str, str] = {}
    name = None
    try:
        with open(os.path.join(config_dir, "main.cf"), encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.read().splitlines()
    except OSError as e:
        raise PostfixError(f"cannot read main.cf: {e}") from e
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if name is not None:
                out[name] = f"{out[name]} {stripped}".strip()
            continue
        key, eq, value = line.partition("=")
        name = key.strip() if eq else None
        if name is not None:
            out[name] = value.strip()
    return out


def _master(config_dir: str) -> dict[str, str]:
    """master.cf's entries (``postconf -M``), ``service/type`` -> the entry on one line."""
    out = {}
    for line in postconf(["-M"], config_dir).splitlines():
        fields = line.split()
        if len(fields) >= 8:
            out[f"{fields[0]}/{fields[1]}"] = " ".join(fields)
    return out


def read_env(config_dir: str | None, version: str | None = None) -> PostfixEnv:
    """What ``postconf`` reports about the live configuration."""
    cdir = postconf(["-h", "config_directory"], config_dir).strip()
    names = (*READ_PARAMS, "mail_version", "queue_directory")
    lines = postconf(["-h", *names], cdir).splitlines()
    if len(lines) != len(names):
        raise PostfixError(f"postconf -h printed {len(lines)} lines for {len(names)} parameters")
    values = dict(zip(names, (line.strip() for line in lines), strict=True))
    return PostfixEnv(
        PostfixFeatures.from_macro(version or values["mail_version"]),
        cdir,
        values["queue_directory"],
        {k: values[k] for k in READ_PARAMS},
        frozenset(_explicit(cdir)),
        _master(cdir),
    )


def admin_view(env: PostfixEnv) -> PostfixEnv:
    """``env`` as the admin set it: the parameters we added to main.cf (by the journal, or by an old backup)
    count as not set, so that planning again gives the same plan.  One of ours that the admin changed since
    stays ours: the plan keeps it, and reconciling reports the change as a conflict (kept unless --force)
    instead of quietly giving the parameter up."""
    cdir = env.config_directory
    journal = Journal.load(cdir)
    live = _explicit(cdir)
    if journal is not None:
        ours = {n for n, r in journal.main.items() if r.get("before") is None and "item" not in r}
    elif os.path.isfile(os.path.join(cdir, BACKUP_DIR, "main.cf")):
        ours = set(live) - set(_explicit(os.path.join(cdir, BACKUP_DIR)))
    else:
        return env
    return PostfixEnv(env.version, env.config_directory, env.queue_directory, env.current, env.explicit - ours,
                      env.master)


def _norm(value: str | None) -> str | None:
    return None if value is None else " ".join(value.split())


def _same_list(a: str | None, b: str | None) -> bool:
    return [re.sub(r"\s+", "", i) for i in _split_list(a or "")] == [re.sub(r"\s+", "", i) for i in
                                                                       _split_list(b or "")]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Journal:
    """What we changed: ``main``/``master``: key -> {"before": str|None, "ours": str|None[, "item": str]};
    ``files``: name -> sha256 of what we wrote."""

    main: dict[str, dict[str, Any]] = field(default_factory=dict)
    master: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, cdir: str) -> Journal | None:
        path = os.path.join(cdir, JOURNAL)
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            return cls(dict(data["main"]), dict(data["master"]), dict(data["files"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PostfixError(f"{path}: unreadable journal ({e}); fix or remove it") from e

    def save(self, cdir: str) -> None:
        path = os.path.join(cdir, JOURNAL)
        text = json.dumps({"version": 1, "main": self.main, "master": self.master, "files": self.files},
                          indent=1, sort_keys=True) + "\n"
        try:
            with open(path, encoding="utf-8") as fh:
                if fh.read() == text:
                    return
        except OSError:
            pass
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(path + ".tmp", 0o644)
        os.replace(path + ".tmp", path)


#: main.cf parameters that earlier versions of requiretls set and this one does not.
FORMERLY_OURS = ("milter_default_action",)


def _from_backup(cdir: str, plan: Plan) -> Journal | None:
    """A journal for a configuration applied by a version that kept ``requiretls.backup/`` instead."""
    backup = os.path.join(cdir, BACKUP_DIR)
    if not os.path.isfile(os.path.join(backup, "main.cf")):
        return None
    before, live = _explicit(backup), _explicit(cdir)
    before_m, live_m = _master(backup), _master(cdir)
    items = dict(plan.items)
    j = Journal()
    # Parameters an earlier version set and this one no longer does: recorded too, so that --apply takes
    # them back and --undo restores them (the backup version set milter_default_action = tempfail).
    for name in [*(n for n, _ in plan.main), *(n for n in FORMERLY_OURS if n not in dict(plan.main))]:
        if name in live and live.get(name) != before.get(name):
            j.main[name] = {"before": before.get(name), "ours": live[name]}
            if name in items:
                j.main[name]["item"] = items[name]
    for m in plan.master:
        key = f"{m.service}/{m.type}"
        if key in live_m and live_m.get(key) != before_m.get(key):
            j.master[key] = {"before": before_m.get(key), "ours": live_m[key]}
    for name, _ in plan.files:
        path = os.path.join(cdir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                j.files[name] = _sha(fh.read())
    return j


def _port(service: str) -> tuple[str, str]:
    host, sep, port = service.rpartition(":")
    return (host.strip("[]") if sep else ""), port


def _clashes(ours: str, theirs: str) -> bool:
    """Two inet services that would listen on the same address."""
    (h1, p1), (h2, p2) = _port(ours), _port(theirs)
    wild = ("", "*", "0.0.0.0", "::", "0:0:0:0:0:0:0:0")
    return p1 == p2 and (h1 == h2 or h1 in wild or h2 in wild or "localhost" in (h1, h2))


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)


def _service_conflicts(plan: Plan, live_m: Mapping[str, str], journal: Journal) -> list[str]:
    errors = []
    for m in plan.master:
        key = f"{m.service}/{m.type}"
        if key in journal.master or m.adopt:
            continue
        if key in live_m:
            errors.append(f"master.cf already has a service {key} that requiretls did not add: {live_m[key]!r}")
            continue
        if m.type == "inet":
            for other, line in live_m.items():
                name, _, kind = other.partition("/")
                if kind == "inet" and other not in journal.master and _clashes(m.service, name):
                    errors.append(f"master.cf service {other} already listens where requiretls's re-injection "
                                  f"service {m.service} would: {line!r}")
    return errors


def reconcile(plan: Plan, env: PostfixEnv, *, force: bool = False, dry_run: bool = False,
              tables_only: bool = False) -> Outcome:
    """Bring the live configuration to the plan, changing only what differs and what is ours."""
    cdir = env.config_directory
    journal = Journal.load(cdir) or _from_backup(cdir, plan) or Journal()
    live, live_m = _explicit(cdir), _master(cdir)
    out = Outcome()
    errors = [] if tables_only else _service_conflicts(plan, live_m, journal)
    if errors:
        raise PostfixError("nothing changed:\n  " + "\n  ".join(errors)
                           + "\n  (remove or move that service, or set [relay] reinject to a free address)")
    items = dict(plan.items)
    set_main: dict[str, str] = {}
    drop_main: list[str] = []
    set_master: dict[str, str] = {}
    drop_master: list[str] = []
    renames: list[tuple[str, str, str]] = []

    if not tables_only:
        for name, value in plan.main:
            rec = journal.main.get(name)
            cur = live.get(name)
            if name in items:
                if rec is None:
                    rec = journal.main[name] = {"before": cur, "ours": value, "item": items[name]}
                if not _same_list(cur, value):
                    set_main[name] = value
                rec["ours"], rec["item"] = value, items[name]
                continue
            if rec is None:
                journal.main[name] = {"before": cur, "ours": value}
                if _norm(cur) != _norm(value):
                    set_main[name] = value
                continue
            if _norm(cur) == _norm(value):
                rec["ours"] = value
            elif _norm(cur) == _norm(rec["ours"]) or force:
                set_main[name] = value
                rec["ours"] = value
            else:
                out.conflicts.append(f"main.cf: {name} = {cur!r} was changed since requiretls set {rec['ours']!r};"
                                     f" kept (requiretls wants {value!r}; --force to write it)")
        for m in plan.master:
            key = f"{m.service}/{m.type}"
            rec = journal.master.get(key)
            cur = live_m.get(key)
            if m.rename_from and rec is None and cur is None:
                # In place, as text: the admin's lines are kept verbatim for --undo (postconf -M would put
                # a new entry last and reformat the old one's spacing).
                if m.rename_from not in live_m:
                    out.conflicts.append(f"master.cf: no {m.rename_from} to move to {key}; nothing moved")
                    continue
                journal.master[key] = {"before": None, "ours": m.line, "from": m.rename_from, "block": ""}
                renames.append((key, m.rename_from, m.line))
                continue
            want = m.line or None  # an adopted entry we take out (the public smtpd behind the front)
            if rec is None:
                journal.master[key] = {"before": cur if m.adopt else None, "ours": want}
                if _norm(cur) != _norm(want):
                    _set_master(key, want, set_master, drop_master)
            elif _norm(cur) == _norm(want):
                rec["ours"] = want
            elif _norm(cur) == _norm(rec["ours"]) or force:
                _set_master(key, want, set_master, drop_master)
                rec["ours"] = want
            else:
                out.conflicts.append(f"master.cf: {key} was changed since requiretls set it; kept: {cur!r}"
                                     " (--force to write ours again)")
        # Ours before, not in the plan any more (another reinject address, --no-policyd): take them back.
        wanted = {n for n, _ in plan.main}
        for name in [n for n in journal.main if n not in wanted]:
            _revert_main(name, journal.main.pop(name), live, set_main, drop_main, out)
        wanted_m = {f"{m.service}/{m.type}" for m in plan.master}
        for key in [k for k in journal.master if k not in wanted_m]:
            _revert_master(key, journal.master.pop(key), live_m, set_master, drop_master, out)

    write_files = []
    for name, text in plan.files:
        path = os.path.join(cdir, name)
        try:
            with open(path, encoding="utf-8") as fh:
                current = fh.read()
        except FileNotFoundError:
            current = None
        if current != text:
            write_files.append((path, text))
        journal.files[name] = _sha(text)

    out.done += [f"wrote {p}" for p, _ in write_files]
    out.done += [f"main.cf: {k} = {v}" for k, v in set_main.items()]
    out.done += [f"main.cf: removed {k}" for k in drop_main]
    out.done += [f"master.cf: {k}" for k in set_master]
    out.done += [f"master.cf: removed {k}" for k in drop_master]
    out.done += [f"master.cf: {old} moved to {k}" for k, old, _ in renames]
    if dry_run:
        return out
    master_cf = os.path.join(cdir, "master.cf")
    for key, old, _line in renames:
        journal.master[key]["block"] = _entry_block(master_cf, old)
    # The journal first: whatever happens next, --undo knows what may be ours.
    journal.save(cdir)
    for key, _old, line in renames:
        _replace_block(master_cf, journal.master[key]["block"], _format_entry(line))
    for path, text in write_files:
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(path + ".tmp", 0o644)
        os.replace(path + ".tmp", path)
    _write(cdir, set_main, drop_main, set_master, drop_master)
    backup = os.path.join(cdir, BACKUP_DIR)
    if os.path.isdir(backup):
        shutil.rmtree(backup)
        out.done.append(f"removed {backup} (replaced by {os.path.join(cdir, JOURNAL)})")
    return out


def _set_master(key: str, line: str | None, set_master: dict[str, str], drop_master: list[str]) -> None:
    if line is None:
        drop_master.append(key)
    else:
        set_master[key] = line


def _write(cdir: str, set_main: Mapping[str, str], drop_main: Sequence[str], set_master: Mapping[str, str],
           drop_master: Sequence[str]) -> None:
    if set_main:
        postconf(["-e", *(f"{k}={v}" for k, v in set_main.items())], cdir)
    if drop_main:
        postconf(["-X", *drop_main], cdir)
    for key, line in set_master.items():
        postconf(["-M", f"{key}={line}"], cdir)
    if drop_master:
        postconf(["-MX", *drop_master], cdir)


def _revert_main(name: str, rec: Mapping[str, Any], live: Mapping[str, str], set_main: dict[str, str],
                 drop_main: list[str], out: Outcome) -> None:
    cur, before, ours = live.get(name), rec.get("before"), rec.get("ours")
    item = rec.get("item")
    if item is not None:
        listed = _split_list(cur or "")
        rest = _without_ours(listed, item)
        if len(rest) == len(listed):
            return
        if _same_list(", ".join(rest), before):
            target = before
        else:
            target = ", ".join(rest)
            out.conflicts.append(f"main.cf: {name}: removed our {item}; kept the later changes: {target!r}")
    elif _norm(cur) == _norm(ours):
        target = before
    else:
        out.conflicts.append(f"main.cf: {name} = {cur!r} was changed since requiretls set {ours!r}; kept "
                             f"(it was {before!r} before requiretls)")
        return
    if target is None or (item is not None and not target and before is None):
        drop_main.append(name)
    else:
        set_main[name] = target


def _entry_block(master_cf: str, key: str) -> str:
    """The lines of master.cf's ``service/type`` entry, verbatim (its first line and the continuation lines)."""
    service, kind = key.split("/", 1)
    with open(master_cf, encoding="utf-8") as fh:
        lines = fh.read().splitlines(keepends=True)
    for i, ln in enumerate(lines):
        f = ln.split()
        if ln[:1].isspace() or ln.startswith("#") or len(f) < 2 or (f[0], f[1]) != (service, kind):
            continue
        j = i + 1
        while j < len(lines) and lines[j][:1] in (" ", "\t") and lines[j].strip():
            j += 1
        return "".join(lines[i:j])
    raise PostfixError(f"{master_cf}: no {key} entry")


def _format_entry(line: str) -> str:
    """One entry as master.cf writes it: the eight fields and command on the first line, an indented line for
    each ``-o``."""
    head, _, rest = line.partition(" -o ")
    opts = ["-o " + o.strip() for o in (" -o " + rest).split(" -o ") if o.strip()] if rest else []
    return head + "\n" + "".join(f"  {o}\n" for o in opts)


def _replace_block(master_cf: str, old: str, new: str) -> None:
    with open(master_cf, encoding="utf-8") as fh:
        text = fh.read()
    if text.count(old) != 1:
        raise PostfixError(f"{master_cf}: the entry to replace is not there exactly once; nothing changed")
    with open(master_cf + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(text.replace(old, new))
    os.chmod(master_cf + ".tmp", os.stat(master_cf).st_mode & 0o7777)
    os.replace(master_cf + ".tmp", master_cf)


def _revert_master(key: str, rec: Mapping[str, Any], live_m: Mapping[str, str], set_master: dict[str, str],
                   drop_master: list[str], out: Outcome, blocks: list[tuple[str, str]] | None = None) -> None:
    cur = live_m.get(key)
    if rec.get("from"):
        if _norm(cur) != _norm(rec.get("ours")):
            out.conflicts.append(f"master.cf: {key} was changed since requiretls moved {rec['from']} there; kept: "
                                 f"{cur!r}")
        elif blocks is not None:
            blocks.append((key, rec["block"]))
        return
    if cur is None and rec.get("before") is None:
        return
    if _norm(cur) != _norm(rec.get("ours")):
        out.conflicts.append(f"master.cf: {key} was changed since requiretls set it; kept: {cur!r}")
        return
    if rec.get("before") is None:
        drop_master.append(key)
    else:
        set_master[key] = rec["before"]


def undo(plan: Plan, env: PostfixEnv, *, dry_run: bool = False) -> Outcome:
    """Take back what the journal says we changed, where it still holds our value; remove our files."""
    cdir = env.config_directory
    journal = Journal.load(cdir) or _from_backup(cdir, plan)
    if journal is None:
        raise PostfixError(f"nothing to undo: no {os.path.join(cdir, JOURNAL)}")
    live, live_m = _explicit(cdir), _master(cdir)
    out = Outcome()
    set_main: dict[str, str] = {}
    drop_main: list[str] = []
    set_master: dict[str, str] = {}
    drop_master: list[str] = []
    for name, rec in journal.main.items():
        _revert_main(name, rec, live, set_main, drop_main, out)
    blocks: list[tuple[str, str]] = []
    for key, rec in journal.master.items():
        _revert_master(key, rec, live_m, set_master, drop_master, out, blocks)
    remove = []
    for name, sha in journal.files.items():
        path = os.path.join(cdir, name)
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except FileNotFoundError:
            continue
        if _sha(text) == sha:
            remove.append(path)
        else:
            out.conflicts.append(f"{path} was edited since requiretls wrote it; kept")
    out.done += [f"main.cf: {k} = {v}" for k, v in set_main.items()]
    out.done += [f"main.cf: removed {k}" for k in drop_main]
    out.done += [f"master.cf: {k} restored" for k in set_master]
    out.done += [f"master.cf: removed {k}" for k in drop_master]
    out.done += [f"removed {p}" for p in remove]
    out.done += [f"master.cf: {k} moved back" for k, _ in blocks]
    if dry_run:
        return out
    master_cf = os.path.join(cdir, "master.cf")
    for key, block in blocks:
        _replace_block(master_cf, _entry_block(master_cf, key), block)
    _write(cdir, set_main, drop_main, set_master, drop_master)
    for path in remove:
        os.unlink(path)
    for stale in (os.path.join(cdir, JOURNAL),):
        if os.path.exists(stale):
            os.unlink(stale)
            out.done.append(f"removed {stale}")
    backup = os.path.join(cdir, BACKUP_DIR)
    if os.path.isdir(backup):
        shutil.rmtree(backup)
        out.done.append(f"removed {backup}")
    return out
