"""Read the live Postfix configuration and change it with ``postconf -e`` / ``postconf -M``, reversibly.

The first ``--apply`` copies main.cf and master.cf to ``<config_directory>/requiretls.backup/``.  Every later
``--apply`` plans from that backup, not from the already changed files, so applying twice gives the same
result; ``--undo`` puts the two files back and removes what we wrote, leaving ``postconf -n`` and
``postconf -M`` exactly as they were.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from requiretls.policy.route import PostfixFeatures
from requiretls.postfix.generate import READ_PARAMS, Plan, PostfixEnv

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


def read_env(config_dir: str | None, version: str | None = None) -> PostfixEnv:
    """What ``postconf`` reports, from the backup if a previous ``--apply`` made one."""
    cdir = postconf(["-h", "config_directory"], config_dir).strip()
    backup = os.path.join(cdir, BACKUP_DIR)
    source = backup if os.path.isfile(os.path.join(backup, "main.cf")) else cdir
    values = {}
    for name in (*READ_PARAMS, "mail_version", "queue_directory"):
        values[name] = postconf(["-h", name], source).strip()
    explicit = frozenset(
        line.split("=", 1)[0].strip() for line in postconf(["-n"], source).splitlines() if "=" in line
    )
    return PostfixEnv(
        PostfixFeatures.from_macro(version or values["mail_version"]),
        cdir,
        values["queue_directory"],
        {k: values[k] for k in READ_PARAMS},
        explicit,
    )


def apply(plan: Plan, env: PostfixEnv) -> list[str]:
    """Write the plan into the live configuration.  Returns what was done, one line each."""
    cdir = env.config_directory
    backup = os.path.join(cdir, BACKUP_DIR)
    done = []
    if not os.path.isfile(os.path.join(backup, "main.cf")):
        os.makedirs(backup, mode=0o755, exist_ok=True)
        for f in ("main.cf", "master.cf"):
            shutil.copy2(os.path.join(cdir, f), os.path.join(backup, f))
        done.append(f"backup: {backup}/main.cf, master.cf")
    else:
        # Start again from the original files, so that applying twice changes nothing.
        for f in ("main.cf", "master.cf"):
            shutil.copy2(os.path.join(backup, f), os.path.join(cdir, f))
    for name, text in plan.files:
        path = os.path.join(cdir, name)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        done.append(f"wrote {path}")
    postconf(["-e", *(f"{k}={v}" for k, v in plan.main)], cdir)
    done += [f"main.cf: {k} = {v}" for k, v in plan.main]
    for m in plan.master:
        postconf(["-M", f"{m.service}/{m.type}={m.line}"], cdir)
        done.append(f"master.cf: {m.service}/{m.type}")
    return done


def undo(plan: Plan, env: PostfixEnv) -> list[str]:
    """Put main.cf and master.cf back from the backup and remove the files we wrote."""
    cdir = env.config_directory
    backup = os.path.join(cdir, BACKUP_DIR)
    if not os.path.isfile(os.path.join(backup, "main.cf")):
        raise PostfixError(f"nothing to undo: no backup in {backup}")
    done = []
    for f in ("main.cf", "master.cf"):
        shutil.copy2(os.path.join(backup, f), os.path.join(cdir, f))
        done.append(f"restored {cdir}/{f}")
    for name, _ in plan.files:
        path = os.path.join(cdir, name)
        if os.path.exists(path):
            os.unlink(path)
            done.append(f"removed {path}")
    shutil.rmtree(backup)
    done.append(f"removed {backup}")
    return done
