"""requiretls postfix-config: generated lines per Postfix version, and a reversible --apply on a real postconf."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from requiretls.policy import LocalPolicy, PolicyTable
from requiretls.policy.route import PostfixFeatures
from requiretls.postfix.cli import offline_env
from requiretls.postfix.generate import PostfixEnv, generate, postfix_socket, relaxed_policy_table, render

ROOT = Path(__file__).resolve().parents[2]
MILTER = "unix:/var/spool/postfix/requiretls/milter.sock"
RELAY = "unix:/var/spool/postfix/requiretls/relay.sock"
REINJECT = "127.0.0.1:10026"


def _plan(version: str, current: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    env = offline_env(version)
    if current:
        env = PostfixEnv(env.version, env.config_directory, env.queue_directory, {**env.current, **current})
    plan = generate(env, LocalPolicy(), MILTER, RELAY, REINJECT)
    return dict(plan.main), dict(plan.files)


@pytest.mark.parametrize("version", ["3.7", "3.10", "3.11"])
def test_every_version_gets_tempfail_milter_and_forgery_stripping(version: str) -> None:
    main, files = _plan(version)
    # default_action=tempfail on our milter alone: the admin's milters keep their own milter_default_action.
    assert "milter_default_action" not in main
    assert main["smtpd_milters"] == "{ unix:requiretls/milter.sock, default_action=tempfail }"
    assert ("/^(X-RequireTLS-Route|X-RequireTLS-Handback|X-RequireTLS-Nexthop):/ IGNORE"
            in files["requiretls_header_checks"])
    assert "FILTER lmtp:unix:requiretls/relay.sock" in files["requiretls_milter_header_checks"]
    assert "FILTER requiretls-relaxed:" in files["requiretls_milter_header_checks"]


def test_tls_required_is_renamed_only_where_postfix_would_apply_it_natively() -> None:
    assert "REPLACE" not in _plan("3.7")[1]["requiretls_header_checks"]
    for v in ("3.10", "3.11"):
        assert "/^TLS-Required:(.*)$/ REPLACE X-Original-TLS-Required:$1" in _plan(v)[1]["requiretls_header_checks"]


def test_existing_milters_and_header_checks_are_kept_and_ours_come_first() -> None:
    ours = "{ unix:requiretls/milter.sock, default_action=tempfail }"
    main, _ = _plan("3.7", {"smtpd_milters": f"inet:localhost:8891, {ours}", "header_checks": "pcre:/etc/postfix/hc"})
    assert main["smtpd_milters"] == "{ unix:requiretls/milter.sock, default_action=tempfail }, inet:localhost:8891"
    assert main["header_checks"] == "regexp:/etc/postfix/requiretls_header_checks, pcre:/etc/postfix/hc"
    assert main["nested_header_checks"] == "pcre:/etc/postfix/hc"


def test_socket_specs_are_translated_for_postfix() -> None:
    assert postfix_socket("unix:/var/spool/postfix/x/m.sock", "/var/spool/postfix") == "unix:x/m.sock"
    assert postfix_socket("unix:/run/m.sock", "/var/spool/postfix") == "unix:/run/m.sock"
    assert postfix_socket("inet:8899@127.0.0.1", "/q") == "inet:127.0.0.1:8899"
    # Postfix's milter client knows only inet: and unix: (milter8.c); an IPv6 host goes in brackets.
    # (This assertion expected "inet6:[::1]:8899" before, which Postfix does not accept.)
    assert postfix_socket("inet6:8899@::1", "/q") == "inet:[::1]:8899"
    assert postfix_socket("inet:127.0.0.1:8899", "/q") == "inet:127.0.0.1:8899"
    assert postfix_socket("inet:[::1]:8899", "/q") == "inet:[::1]:8899"
    assert postfix_socket("local:/q/m.sock", "/q") == "unix:m.sock"


def test_relaxed_table_keeps_the_policy_of_optout_no_destinations() -> None:
    table = PolicyTable.parse("bank.example dane-only optout=no\npartner.example optout=no\nx.example dane\n", "t")
    text = relaxed_policy_table(LocalPolicy(table=table), "dane")
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == ["bank.example\tdane-only", "partner.example\tdane"]


@pytest.mark.parametrize("version", ["3.7", "3.10", "3.11"])
def test_contrib_snippets_match_the_generator(version: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "requiretls", "postfix-config", "--offline", "--postfix-version", version],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    assert (ROOT / "contrib" / "postfix" / f"postfix-{version}.conf").read_text() == out


needs_postconf = pytest.mark.skipif(shutil.which("postconf") is None,
                                    reason="Postfix is not installed (make deps installs it)")
DKIM = "inet:localhost:8891"


class Instance:
    """A private copy of Debian's default Postfix configuration, driven with the real postconf -c."""

    def __init__(self, path: Path, main: str = "") -> None:
        self.dir = path
        shutil.copy("/usr/share/postfix/master.cf.dist", path / "master.cf")
        debian = Path("/usr/share/postfix/main.cf.debian")
        base = debian.read_text() if debian.exists() else "compatibility_level = 3.6\n"
        (path / "main.cf").write_text(base + main)
        self.config = path / "requiretls.toml"
        self.config.write_text("")

    def pc(self, *a: str) -> str:
        return subprocess.run(["postconf", "-c", str(self.dir), *a], capture_output=True, text=True,
                              check=True).stdout

    def tool(self, *a: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "requiretls", "postfix-config", "--config",
                               str(config or self.config), "-c", str(self.dir), *a],
                              capture_output=True, text=True, timeout=60)

    def ok(self, *a: str) -> str:
        r = self.tool(*a)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout + r.stderr

    def files(self) -> dict[str, bytes]:
        return {f: (self.dir / f).read_bytes() for f in ("main.cf", "master.cf")}


@needs_postconf
def test_apply_twice_then_undo_leaves_main_and_master_cf_byte_for_byte(tmp_path: Path) -> None:
    """Real postconf on a copy of Debian's default configuration: --apply is idempotent (the second run writes
    nothing) and --undo restores both files exactly when nothing else changed."""
    pf = Instance(tmp_path, "smtpd_milters = inet:localhost:8891\nheader_checks = regexp:/etc/postfix/hc\n")
    before = pf.files()
    pf.ok("--apply")
    once = pf.files()
    assert "requiretls/milter.sock" in pf.pc("-h", "smtpd_milters")
    assert pf.pc("-M", "requiretls-relaxed/unix").startswith("requiretls-relaxed unix")
    assert (tmp_path / "requiretls.journal").exists()
    assert "nothing to change" in pf.ok("--apply")
    assert pf.files() == once
    assert pf.tool("--check").returncode == 0
    pf.ok("--apply", "--undo")
    assert pf.files() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["main.cf", "master.cf", "requiretls.toml"]
    assert PostfixFeatures.from_macro(pf.pc("-h", "mail_version")).version >= (3, 7)


@needs_postconf
def test_later_admin_edits_survive_reapply_and_undo(tmp_path: Path) -> None:
    pf = Instance(tmp_path)
    before = pf.pc("-n"), pf.pc("-M")
    pf.ok("--apply")
    # The admin's later edits: main.cf settings, a new service, a milter of their own after ours.
    pf.pc("-e", "relayhost=[relay.example]:587", "myhostname=mx.example.org", "smtpd_banner=$myhostname ESMTP",
          f"smtpd_milters={pf.pc('-h', 'smtpd_milters').strip()}, {DKIM}")
    pf.pc("-M", "submission/inet=submission inet n - y - - smtpd -o syslog_name=postfix/submission")
    edited = pf.files()
    assert "nothing to change" in pf.ok("--apply")
    assert pf.files() == edited
    out = pf.ok("--apply", "--undo")
    assert f"kept the later changes: '{DKIM}'" in out
    n = pf.pc("-n")
    for line in ("relayhost = [relay.example]:587", "myhostname = mx.example.org",
                 "smtpd_banner = $myhostname ESMTP", f"smtpd_milters = {DKIM}"):
        assert line in n.splitlines()
    assert "requiretls" not in n and "requiretls" not in pf.pc("-M")
    assert pf.pc("-M", "submission/inet").split() == [
        "submission", "inet", "n", "-", "y", "-", "-", "smtpd", "-o", "syslog_name=postfix/submission"]
    assert set(n.splitlines()) - set(before[0].splitlines()) == {
        "relayhost = [relay.example]:587", "myhostname = mx.example.org", "smtpd_banner = $myhostname ESMTP",
        f"smtpd_milters = {DKIM}"}


@needs_postconf
def test_a_value_of_ours_changed_by_the_admin_is_a_conflict_kept_by_apply_and_undo(tmp_path: Path) -> None:
    pf = Instance(tmp_path)
    pf.ok("--apply")
    pf.pc("-e", "smtpd_forbid_bare_newline=no")
    pf.pc("-M", "requiretls-relaxed/unix=requiretls-relaxed unix - - n - 4 smtp")
    edited = pf.files()
    r = pf.tool("--apply")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "smtpd_forbid_bare_newline = 'no' was changed since requiretls set 'normalize'; kept" in r.stderr
    assert "master.cf: requiretls-relaxed/unix was changed since requiretls set it; kept" in r.stderr
    assert pf.files() == edited
    check = pf.tool("--check")
    assert check.returncode == 1 and "drift (conflict): main.cf: smtpd_forbid_bare_newline" in check.stdout
    out = pf.ok("--apply", "--undo")
    assert "smtpd_forbid_bare_newline = 'no' was changed since requiretls set 'normalize'; kept" in out
    assert pf.pc("-h", "smtpd_forbid_bare_newline").strip() == "no"
    assert pf.pc("-M", "requiretls-relaxed/unix").split()[:7] == ["requiretls-relaxed", "unix", "-", "-", "n", "-", "4"]
    assert "requiretls" not in pf.pc("-h", "smtpd_milters")


@needs_postconf
def test_force_writes_ours_over_the_admins_value(tmp_path: Path) -> None:
    pf = Instance(tmp_path)
    pf.ok("--apply")
    pf.pc("-e", "smtpd_forbid_bare_newline=no")
    assert pf.tool("--check").returncode == 1
    pf.ok("--apply", "--force")
    assert pf.pc("-h", "smtpd_forbid_bare_newline").strip() == "normalize"
    assert pf.tool("--check").returncode == 0


@needs_postconf
def test_check_exit_codes(tmp_path: Path) -> None:
    pf = Instance(tmp_path)
    r = pf.tool("--check")
    assert r.returncode == 1 and "drift: main.cf: smtpd_milters" in r.stdout
    pf.ok("--apply")
    assert pf.tool("--check").returncode == 0
    pf.pc("-X", "header_checks")
    r = pf.tool("--check")
    assert r.returncode == 1 and "drift: main.cf: header_checks" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[nosuch]\n")
    assert pf.tool("--check", config=bad).returncode == 2
    assert subprocess.run([sys.executable, "-m", "requiretls", "postfix-config", "--config", str(pf.config),
                           "-c", str(tmp_path / "missing"), "--check"], capture_output=True).returncode == 2


@needs_postconf
def test_an_existing_service_at_the_reinjection_address_stops_apply_before_any_change(tmp_path: Path) -> None:
    pf = Instance(tmp_path)
    pf.pc("-M", "127.0.0.1:10026/inet=127.0.0.1:10026 inet n - n - - smtpd -o content_filter=")
    before = pf.files()
    r = pf.tool("--apply")
    assert r.returncode == 2
    assert "nothing changed" in r.stderr and "127.0.0.1:10026/inet" in r.stderr and "requiretls did not add" in r.stderr
    assert pf.files() == before and not (tmp_path / "requiretls.journal").exists()
    # The same port on every address, under another name, clashes too.
    pf.pc("-MX", "127.0.0.1:10026/inet")
    pf.pc("-M", "10026/inet=10026 inet n - n - - smtpd")
    r = pf.tool("--apply")
    assert r.returncode == 2 and "master.cf service 10026/inet already listens" in r.stderr
    # A service name of ours taken by somebody else.
    pf.pc("-MX", "10026/inet")
    pf.pc("-M", "requiretls-relaxed/unix=requiretls-relaxed unix - - n - - smtp")
    r = pf.tool("--apply")
    assert r.returncode == 2 and "requiretls-relaxed/unix" in r.stderr
    assert not (tmp_path / "requiretls.journal").exists()


@needs_postconf
def test_non_smtpd_milters_naming_smtpd_milters_lists_our_milter_once(tmp_path: Path) -> None:
    pf = Instance(tmp_path, f"smtpd_milters = {DKIM}\nnon_smtpd_milters = $smtpd_milters\n")
    out = pf.ok("--apply")
    assert "note: non_smtpd_milters = $smtpd_milters: our milter comes through it, once" in out
    assert f"note: smtpd_milters: ours first, then {DKIM}" in out
    assert pf.pc("-h", "non_smtpd_milters").strip() == "$smtpd_milters"
    for name in ("smtpd_milters", "non_smtpd_milters"):
        expanded = pf.pc("-xh", name)
        assert expanded.count("requiretls/milter.sock") == 1, expanded
        assert expanded.index("requiretls/milter.sock") < expanded.index(DKIM)
    pf.ok("--apply", "--undo")
    assert pf.pc("-h", "smtpd_milters").strip() == DKIM


@needs_postconf
def test_a_signer_listed_before_ours_is_moved_after_it(tmp_path: Path) -> None:
    ours = "{ unix:requiretls/milter.sock, default_action=tempfail }"
    pf = Instance(tmp_path,
                  f"smtpd_milters = {DKIM}, inet:localhost:8892\nnon_smtpd_milters = {DKIM}, $smtpd_milters\n")
    pf.ok("--apply")
    pf.pc("-e", f"smtpd_milters={DKIM}, {ours}, inet:localhost:8892")  # the admin (or another tool) reorders
    out = pf.ok("--apply")
    assert "our milter was not first; it is moved back to the front" in out
    assert _split(pf.pc("-h", "smtpd_milters")) == [ours, DKIM, "inet:localhost:8892"]
    # "$smtpd_milters" among other items is written out, so ours is listed once and first.
    assert _split(pf.pc("-xh", "non_smtpd_milters")) == [ours, DKIM, "inet:localhost:8892"]


def _split(value: str) -> list[str]:
    from requiretls.postfix.generate import _split_list
    return _split_list(value.strip())


@needs_postconf
def test_reinject_address_change_moves_our_service(tmp_path: Path) -> None:
    pf = Instance(tmp_path)
    pf.ok("--apply")
    pf.config.write_text('[relay]\nreinject = "127.0.0.1:10029"\n')
    out = pf.ok("--apply")
    assert "master.cf: removed 127.0.0.1:10026/inet" in out and "master.cf: 127.0.0.1:10029/inet" in out
    assert pf.tool("--check").returncode == 0


@needs_postconf
def test_a_configuration_applied_by_the_backup_version_is_taken_over(tmp_path: Path) -> None:
    """Upgrade: the previous version kept requiretls.backup/ (a copy of the files before its first --apply)
    instead of a journal; the journal is built from it and later edits survive the undo."""
    pf = Instance(tmp_path)
    before, before_n = pf.files(), pf.pc("-n")
    pf.ok("--apply")
    (tmp_path / "requiretls.journal").unlink()  # now as the previous version left it
    backup = tmp_path / "requiretls.backup"
    backup.mkdir()
    for f, data in before.items():
        (backup / f).write_bytes(data)
    applied = pf.files()
    out = pf.ok("--apply")  # builds the journal from the backup, and removes the backup
    assert "main.cf:" not in out and "master.cf:" not in out and "requiretls.backup" in out
    assert pf.files() == applied
    assert not backup.exists() and (tmp_path / "requiretls.journal").exists()
    pf.pc("-e", "relayhost=[relay.example]")
    pf.ok("--apply", "--undo")
    assert sorted(pf.pc("-n").splitlines()) == sorted([*before_n.splitlines(), "relayhost = [relay.example]"])


@needs_postconf
def test_a_parameter_the_backup_version_set_and_this_one_does_not_is_taken_back(tmp_path: Path) -> None:
    """The backup version also set milter_default_action = tempfail, which this one leaves to the admin:
    taking over its configuration records it, the next --apply takes it back, --undo is exact."""
    pf = Instance(tmp_path)
    before = pf.files()
    pf.ok("--apply")
    pf.pc("-e", "milter_default_action=tempfail")  # what the previous version wrote
    (tmp_path / "requiretls.journal").unlink()
    backup = tmp_path / "requiretls.backup"
    backup.mkdir()
    for f, data in before.items():
        (backup / f).write_bytes(data)
    out = pf.ok("--apply")
    assert "main.cf: removed milter_default_action" in out, out
    assert "milter_default_action" not in pf.pc("-n")
    pf.ok("--apply", "--undo")
    assert pf.files() == before


def _run_cli(*argv: str) -> tuple[int, str]:
    import argparse
    import contextlib
    import io

    from requiretls.postfix import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = cli.run(p.parse_args(list(argv)))
    return rc, out.getvalue()


def test_without_config_the_daemons_config_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's downgrade: postfix-config run as documented (no --config) must see the policy table's
    optout=no destinations, or the relaxed clone would send their opted-out mail at 'may'."""
    from requiretls.postfix import cli

    (tmp_path / "policy").write_text("bank.example dane-only optout=no\n")
    conf = tmp_path / "requiretls.toml"
    conf.write_text('[policy]\ntable = "policy"\n')
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_FILE", str(conf))
    rc, out = _run_cli("--offline", "--postfix-version", "3.7")
    assert rc == 0 and "bank.example\tdane-only" in out
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent.toml"))
    rc, out = _run_cli("--offline", "--postfix-version", "3.7")
    assert rc == 0 and "bank.example" not in out  # built-in defaults, said on stderr


@needs_postconf
def test_tables_rewrites_only_the_tables(tmp_path: Path) -> None:
    pf = Instance(tmp_path)
    pf.ok("--apply")
    files = pf.files()
    (tmp_path / "policy").write_text("bank.example dane-only optout=no\n")
    pf.config.write_text('[policy]\ntable = "policy"\n')
    assert pf.tool("--check").returncode == 1  # the relaxed table lags behind the policy table
    out = pf.ok("--tables")
    assert f"wrote {tmp_path}/requiretls_relaxed_policy" in out and "main.cf" not in out.replace("now run", "")
    assert "bank.example\tdane-only" in (tmp_path / "requiretls_relaxed_policy").read_text()
    assert pf.files() == files
    assert pf.tool("--check").returncode == 0


def _filter_env(master: dict[str, str], content_filter: str = "smtp-amavis:[127.0.0.1]:10024",
                version: str = "3.10") -> PostfixEnv:
    env = offline_env(version)
    return PostfixEnv(env.version, env.config_directory, env.queue_directory,
                      {**env.current, "content_filter": content_filter}, env.explicit, master)


AMAVIS_RETURN = ("127.0.0.1:10025 inet n - n - - smtpd -o content_filter= -o mynetworks=127.0.0.0/8 "
                 "-o receive_override_options=no_header_body_checks,no_unknown_recipient_checks")


def test_with_a_content_filter_routes_are_applied_at_its_return_not_on_the_way_in() -> None:
    from requiretls.postfix.generate import FILTER_CLEANUP_SERVICE, MILTER_HEADER_CHECKS

    plan = generate(_filter_env({"127.0.0.1:10025/inet": AMAVIS_RETURN}), LocalPolicy(), MILTER, RELAY, REINJECT)
    main = dict(plan.main)
    assert "milter_header_checks" not in main  # FILTER on the way in would override content_filter
    master = {f"{m.service}/{m.type}": m for m in plan.master}
    ret = master["127.0.0.1:10025/inet"]
    assert ret.adopt
    assert f"-o cleanup_service_name={FILTER_CLEANUP_SERVICE}" in ret.line
    assert "-o receive_override_options=no_unknown_recipient_checks,no_milters" in ret.line
    assert "no_header_body_checks" not in ret.line
    cleanup = master[f"{FILTER_CLEANUP_SERVICE}/unix"].line
    assert f"-o header_checks=regexp:/etc/postfix/{MILTER_HEADER_CHECKS}" in cleanup
    assert "-o tls_required_enable=no" in cleanup
    assert any("return service 127.0.0.1:10025/inet" in n for n in plan.notes)
    # 3.7 has no native TLS-Required: nothing to switch off
    plan37 = generate(_filter_env({"127.0.0.1:10025/inet": AMAVIS_RETURN}, version="3.7"), LocalPolicy(),
                      MILTER, RELAY, REINJECT)
    assert "tls_required_enable" not in " ".join(m.line for m in plan37.master)


def test_a_content_filter_without_a_clear_return_service_is_an_error_naming_the_option() -> None:
    from requiretls.postfix.generate import PlanError

    with pytest.raises(PlanError, match="--filter-return"):
        generate(_filter_env({}), LocalPolicy(), MILTER, RELAY, REINJECT)
    two = {"127.0.0.1:10025/inet": AMAVIS_RETURN, "127.0.0.1:10027/inet": AMAVIS_RETURN.replace("10025", "10027")}
    with pytest.raises(PlanError, match=re.escape("10025/inet, 127.0.0.1:10027/inet")):
        generate(_filter_env(two), LocalPolicy(), MILTER, RELAY, REINJECT)
    plan = generate(_filter_env(two), LocalPolicy(), MILTER, RELAY, REINJECT, filter_return="127.0.0.1:10027/inet")
    assert any(m.service == "127.0.0.1:10027" and m.adopt for m in plan.master)
    # a return service with its own milters (a DKIM signer after the filter) keeps them
    own = AMAVIS_RETURN + " -o smtpd_milters=inet:localhost:8891"
    plan = generate(_filter_env({"127.0.0.1:10025/inet": own}), LocalPolicy(), MILTER, RELAY, REINJECT)
    ret = next(m for m in plan.master if m.adopt)
    assert "no_milters" not in ret.line and "-o smtpd_milters=inet:localhost:8891" in ret.line


@needs_postconf
def test_content_filter_apply_and_undo_on_real_postconf(tmp_path: Path) -> None:
    pf = Instance(tmp_path, "content_filter = smtp-amavis:[127.0.0.1]:10024\n")
    pf.pc("-M", "smtp-amavis/unix=smtp-amavis unix - - n - 2 smtp", f"127.0.0.1:10025/inet={AMAVIS_RETURN}")
    before = pf.files()
    out = pf.ok("--apply")
    assert "our routes are applied after it, at its return service 127.0.0.1:10025/inet" in out
    assert "cleanup_service_name=requiretls-filter-cleanup" in pf.pc("-M", "127.0.0.1:10025/inet")
    assert "nothing to change" in pf.ok("--apply")
    pf.ok("--apply", "--undo")
    assert pf.files() == before


@pytest.mark.parametrize("version", ["3.7", "3.10", "3.11"])
def test_local_forwarding_guard_only_where_postfix_drops_the_tag(version: str) -> None:
    """Postfix < 3.11 forwards alias and .forward copies with no milter, header_checks or FILTER: those versions
    get the local(8) clone, its forwarding cleanup and the transport_maps entry back to the agent."""
    env = offline_env(version)
    plan = generate(env, LocalPolicy(), MILTER, RELAY, REINJECT, None, "127.0.0.1:10027")
    services = {m.service for m in plan.master}
    main, files = dict(plan.main), dict(plan.files)
    guarded = version != "3.11"
    assert ({"requiretls-local", "requiretls-rewrite", "requiretls-forward", "127.0.0.1:10027"} <= services) == guarded
    assert ("transport_maps" in main) == guarded
    if guarded:
        assert main["transport_maps"].startswith("regexp:/etc/postfix/requiretls_transport")
        local_in = next(m.line for m in plan.master if m.service == "127.0.0.1:10027")
        assert "-o content_filter=requiretls-local: " in local_in and "-o content_filter= " not in local_in
        assert "lmtp:unix:requiretls/relay.sock" in files["requiretls_transport"]
        assert "${1}.requiretls-forward.invalid" in files["requiretls_forward"]


# --- the opt-out loop (issue 19) ---------------------------------------------------------------------------


def test_delay_warning_time_and_delay_notice_only_where_the_admin_set_none() -> None:
    policy = LocalPolicy(optout_cookie="[no-tls$]")
    env = offline_env("3.10")
    plan = generate(env, policy, MILTER, RELAY, REINJECT)
    main, files = dict(plan.main), dict(plan.files)
    assert main["delay_warning_time"] == "1h"
    assert main["bounce_template_file"] == "/etc/postfix/requiretls_bounce_template"
    template = files["requiretls_bounce_template"]
    assert "delay_template = <<EOF" in template and "[no-tls$$]" in template and "TLS-Required: No" in template
    assert "delay_warning_time was not set" in render(plan, env)
    explicit = PostfixEnv(env.version, env.config_directory, env.queue_directory, env.current,
                          frozenset({"delay_warning_time", "bounce_template_file"}))
    plan2 = generate(explicit, policy, MILTER, RELAY, REINJECT)
    main2, files2 = dict(plan2.main), dict(plan2.files)
    assert "delay_warning_time" not in main2 and "bounce_template_file" not in main2
    assert "requiretls_bounce_template" not in files2


@pytest.mark.parametrize(("version", "rule"), [("3.7", True), ("3.10", False), ("3.11", False)])
def test_release_rule_only_where_postfix_has_no_tls_required(version: str, rule: bool) -> None:
    plan = generate(offline_env(version), LocalPolicy(), MILTER, RELAY, REINJECT)
    files = dict(plan.files)
    cleanup = next(m.line for m in plan.master if m.service == "requiretls-cleanup")
    assert ("requiretls_release_header_checks" in files) is rule
    assert ("header_checks=regexp:/etc/postfix/requiretls_release_header_checks,regexp:" in cleanup) is rule
    if rule:
        assert "/^X-RequireTLS-Route: relaxed$/ FILTER requiretls-relaxed:" in files[
            "requiretls_release_header_checks"]
        # the relaxed clone's smtp_header_checks must not see the FILTER rule (it strips the header instead)
        relaxed = next(m.line for m in plan.master if m.service == "requiretls-relaxed")
        assert "release" not in relaxed


def test_bare_newline_smuggling_is_closed_before_3_9_unless_the_admin_chose() -> None:
    """Issue 17: Postfix < 3.9 ends DATA at a bare-LF dot by default (SMTP smuggling); 3.9's default is set."""
    assert _plan("3.7")[0]["smtpd_forbid_bare_newline"] == "normalize"
    assert _plan("3.7")[0]["smtpd_forbid_bare_newline_exclusions"] == ""
    for v in ("3.10", "3.11"):
        assert "smtpd_forbid_bare_newline" not in _plan(v)[0]  # already Postfix's default there
    env = offline_env("3.7")
    env = PostfixEnv(env.version, env.config_directory, env.queue_directory,
                     {**env.current, "smtpd_forbid_bare_newline": "no"}, frozenset({"smtpd_forbid_bare_newline"}))
    assert "smtpd_forbid_bare_newline" not in dict(generate(env, LocalPolicy(), MILTER, RELAY, REINJECT).main)


@needs_postconf
@pytest.mark.parametrize(("backend", "key", "fields"), [
    ("", "requiretls-front/unix", "requiretls-front unix n - y - - smtpd"),
    ("127.0.0.1:10028", "127.0.0.1:10028/inet", "127.0.0.1:10028 inet n - y - - smtpd"),
])
def test_front_moves_the_public_smtpd_behind_it_and_undo_brings_it_back(tmp_path: Path, backend: str, key: str,
                                                                         fields: str) -> None:
    """--front: smtp/inet (Debian's smtpd) becomes an smtpd reading the PROXY protocol on a public unix socket
    (the default backend) or on loopback TCP, known to the milter by its daemon name, with the process
    settings it had; the admin's own options on it stay; --undo restores master.cf byte for byte."""
    pf = Instance(tmp_path, "")
    if backend:
        pf.config.write_text(f'[front]\nbackend = "{backend}"\n')
    pf.pc("-e", "smtpd_tls_auth_only=yes")
    subprocess.run(["postconf", "-c", str(pf.dir), "-P",
                    "smtp/inet/smtpd_client_restrictions=permit_mynetworks,reject"], check=True)
    before = pf.files()
    out = pf.ok("--apply", "--front")
    assert "SMTP front" in out
    master = pf.pc("-M")
    assert not re.search(r"^smtp\s+inet", master, re.M)
    line = pf.pc("-M", key)
    assert " ".join(line.split()[:8]) == fields, line
    for opt in ("smtpd_upstream_proxy_protocol=haproxy", "milter_macro_daemon_name=requiretls-front",
                "smtpd_tls_security_level=none", "smtpd_tls_auth_only=no",
                "smtpd_client_restrictions=permit_mynetworks,reject"):
        assert opt in line, line
    assert "nothing to change" in pf.ok("--apply", "--front")
    assert pf.tool("--check", "--front").returncode == 0
    pf.ok("--apply", "--undo")
    assert pf.files() == before


@needs_postconf
def test_front_again_with_another_backend_says_where_smtpd_went(tmp_path: Path) -> None:
    """smtpd moved to loopback TCP by an earlier --front (the old default), the config now on the unix default:
    --front names the entry and the two ways out, and changes nothing."""
    pf = Instance(tmp_path, "")
    pf.config.write_text('[front]\nbackend = "127.0.0.1:10028"\n')
    pf.ok("--apply", "--front")
    moved = pf.files()
    pf.config.write_text("")
    r = pf.tool("--apply", "--front")
    assert r.returncode != 0 and "127.0.0.1:10028/inet" in r.stderr and "--undo" in r.stderr, r.stdout + r.stderr
    assert pf.files() == moved


@needs_postconf
def test_front_with_postscreen_moves_postscreen_and_marks_smtpd_pass(tmp_path: Path) -> None:
    pf = Instance(tmp_path, "")
    smtpd = pf.pc("-M", "smtp/inet").strip()
    subprocess.run(["postconf", "-c", str(pf.dir), "-M",
                    "smtp/inet=smtp inet n - y - 1 postscreen",
                    "smtpd/pass=smtpd pass - - y - - smtpd",
                    "dnsblog/unix=dnsblog unix - - y - 0 dnsblog"], check=True)
    before = pf.files()
    # postscreen listens on TCP only: the default unix backend is refused, with the way out.
    r = pf.tool("--apply", "--front")
    assert r.returncode != 0 and "postscreen" in r.stderr and "127.0.0.1:10028" in r.stderr, r.stdout + r.stderr
    assert pf.files() == before
    pf.config.write_text('[front]\nbackend = "127.0.0.1:10028"\n')
    pf.ok("--apply", "--front")
    assert "postscreen_upstream_proxy_protocol=haproxy" in pf.pc("-M", "127.0.0.1:10028/inet")
    assert "milter_macro_daemon_name=requiretls-front" in pf.pc("-M", "smtpd/pass")
    pf.ok("--apply", "--undo")
    assert pf.files() == before
    assert smtpd


def test_front_is_refused_on_postfix_3_11() -> None:
    r = subprocess.run([sys.executable, "-m", "requiretls", "postfix-config", "--offline", "--postfix-version",
                        "3.11", "--front", "--config", ""], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "3.11" in r.stderr
