"""requiretls postfix-config: generated lines per Postfix version, and a reversible --apply on a real postconf."""

from __future__ import annotations

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
    assert main["milter_default_action"] == "tempfail"
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


@pytest.mark.skipif(shutil.which("postconf") is None, reason="Postfix is not installed (make deps installs it)")
def test_apply_twice_then_undo_leaves_postconf_n_and_m_unchanged(tmp_path: Path) -> None:
    """Real postconf on a private config directory: --apply is idempotent and --undo restores exactly."""
    shutil.copy("/usr/share/postfix/master.cf.dist", tmp_path / "master.cf")
    (tmp_path / "main.cf").write_text(
        "compatibility_level = 3.6\nsmtpd_milters = inet:localhost:8891\nheader_checks = regexp:/etc/postfix/hc\n"
    )

    def pc(*a: str) -> str:
        return subprocess.run(["postconf", "-c", str(tmp_path), *a], capture_output=True, text=True,
                              check=True).stdout

    def tool(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "requiretls", "postfix-config", "-c", str(tmp_path), *a],
                              capture_output=True, text=True, timeout=60)

    before_n, before_m = pc("-n"), pc("-M")
    assert tool("--apply").returncode == 0
    once_n, once_m = pc("-n"), pc("-M")
    assert "requiretls/milter.sock" in pc("-h", "smtpd_milters")
    assert pc("-M", "requiretls-relaxed/unix").startswith("requiretls-relaxed unix")
    assert tool("--apply").returncode == 0
    assert (pc("-n"), pc("-M")) == (once_n, once_m)
    r = tool("--apply", "--undo")
    assert r.returncode == 0, r.stderr
    assert (pc("-n"), pc("-M")) == (before_n, before_m)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["main.cf", "master.cf"]
    assert PostfixFeatures.from_macro(pc("-h", "mail_version")).version >= (3, 7)


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
