"""The agent reads Postfix's settings with the real postconf/postmap of this host (skipped without them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from requiretls.addresses import NextHop
from requiretls.config import load
from requiretls.relay.cli import agent_state
from requiretls.relay.postfix import PostfixCommands, PostfixConfigError, PostfixView

pytestmark = pytest.mark.skipif(shutil.which("postconf") is None, reason="needs Postfix's postconf/postmap")


def _conf(tmp_path: Path, main: str, **tables: str) -> PostfixCommands:
    (tmp_path / "main.cf").write_text(main)
    (tmp_path / "master.cf").write_text("")
    for name, body in tables.items():
        (tmp_path / name).write_text(body)
    return PostfixCommands(str(tmp_path))


def test_postconf_settings_are_read_with_expansion(tmp_path: Path) -> None:
    cmds = _conf(tmp_path, f"myhostname = mx1.example\nrelayhost = relay.example:587\n"
                           f"smtp_bind_address = 127.0.0.9\nsmtp_sasl_auth_enable = yes\n"
                           f"smtp_sasl_password_maps = texthash:{tmp_path}/sasl\n"
                           f"sender_dependent_relayhost_maps = texthash:{tmp_path}/sdr\n"
                           f"smtp_tls_CAfile = $config_directory/ca.pem\n",
                 sasl="[relay.example]:587 u1:p1\nmx.relay.example u2:p2\nother.example u3:p3\n",
                 sdr="alice@s.example [smart.example]:2525\n@t.example a.example, [b.example]\n")
    v = PostfixView.read(cmds)
    assert v.helo_name == "mx1.example" and v.bind_address == "127.0.0.9"
    assert v.relayhost == NextHop("relay.example", 587, mx=True)  # unbracketed: MX lookup, as Postfix
    assert v.cafile == f"{tmp_path}/ca.pem"
    assert v.sasl_credentials("relay.example:587", "mx.relay.example", "relay.example") == "u2:p2"
    assert v.sasl_credentials("[relay.example]:587", "mx.relay.example", "relay.example") == "u1:p1"
    assert v.sasl_credentials("x.example", "mx.x.example", "other.example") == "u3:p3"
    assert v.sasl_credentials("x.example", "mx.x.example", "x.example") is None
    assert v.sender_relayhost("alice@s.example") == NextHop("smart.example", 2525, mx=False)
    assert v.sender_relayhost("bob@t.example") == (NextHop("a.example"), NextHop("b.example", mx=False))
    assert v.sender_relayhost("bob@u.example") is None


def test_sasl_off_unless_enabled(tmp_path: Path) -> None:
    cmds = _conf(tmp_path, f"smtp_sasl_password_maps = texthash:{tmp_path}/sasl\n", sasl="x u:p\n")
    assert PostfixView.read(cmds).sasl_maps == ()


def test_unreadable_table_raises_instead_of_answering_not_found(tmp_path: Path) -> None:
    cmds = _conf(tmp_path, f"smtp_sasl_auth_enable = yes\nsmtp_sasl_password_maps = texthash:{tmp_path}/gone\n")
    with pytest.raises(PostfixConfigError, match="gone"):
        PostfixView.read(cmds).sasl_credentials("[r.example]", "r.example", "r.example")


def test_missing_config_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PostfixConfigError):
        PostfixView.read(PostfixCommands(str(tmp_path / "nope")))


def test_command_prefix_is_put_before_the_commands(tmp_path: Path) -> None:
    cmds = _conf(tmp_path, "myhostname = viaprefix.example\n")
    prefixed = PostfixCommands(cmds.config_dir, ("env", "LC_ALL=C"))
    assert PostfixView.read(prefixed).helo_name == "viaprefix.example"
    with pytest.raises(PostfixConfigError):
        PostfixView.read(PostfixCommands(cmds.config_dir, ("/nonexistent/wrapper",)))


def test_toml_keys_win_over_postfix_values(tmp_path: Path) -> None:
    cmds = _conf(tmp_path, "myhostname = pf.example\nrelayhost = [pf-relay.example]\nsmtp_tls_CAfile = /pf/ca\n")
    view = PostfixView.read(cmds)
    cfg = tmp_path / "r.toml"
    cfg.write_text('[relay]\nhelo_name = "toml.example"\nrelayhost = "[toml-relay.example]"\n')
    s = agent_state(load(str(cfg)), view).settings
    assert s.send.helo_name == "toml.example" and s.relayhost == NextHop("toml-relay.example", mx=False)
    assert s.send.cafile == "/pf/ca"
    cfg.write_text("")
    s = agent_state(load(str(cfg)), view).settings
    assert s.send.helo_name == "pf.example" and s.relayhost == NextHop("pf-relay.example", mx=False)


def test_destination_concurrency_limit_reaches_the_agent(tmp_path: Path) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text("[relay]\ndestination_concurrency_limit = 5\npostfix_settings = false\n")
    assert agent_state(load(str(cfg))).settings.destination_concurrency == 5
    cfg.write_text("")
    assert agent_state(load(str(cfg))).settings.destination_concurrency == 20


def test_tls_floor_ciphers_capath_and_timeouts_from_main_cf(tmp_path: Path) -> None:
    from requiretls.relay.cli import send_settings

    cmds = _conf(tmp_path, "smtp_tls_mandatory_protocols = >=TLSv1.3\nsmtp_tls_mandatory_ciphers = high\n"
                           "smtp_tls_CAfile = /pf/ca.pem\nsmtp_tls_CApath = $config_directory/certs\n"
                           "smtp_connect_timeout = 7s\nsmtp_helo_timeout = 2m\nsmtp_data_done_timeout = 600\n"
                           "lmtp_data_done_timeout = 100s\n")
    view = PostfixView.read(cmds)
    assert view.tls_min_version == "TLSv1.3" and view.tls_high_ciphers
    cfg = tmp_path / "r.toml"
    cfg.write_text("")
    send = send_settings(load(str(cfg)).relay, view)
    assert send.tls_min_version == "TLSv1.3" and send.high_ciphers
    assert send.cafile == "/pf/ca.pem" and send.capath == f"{tmp_path}/certs"
    # Within what Postfix's LMTP client waits for the agent: a quarter, a quarter, a half of 100 s.
    assert (send.connect_timeout, send.helo_timeout, send.data_done_timeout) == (7.0, 25.0, 50.0)
    cfg.write_text('[relay]\ncafile = "/toml/ca.pem"\n')
    send = send_settings(load(str(cfg)).relay, view)
    assert send.cafile == "/toml/ca.pem" and send.capath is None  # the TOML CA file replaces Postfix's trust


@pytest.mark.parametrize(("value", "floor"), [("", "TLSv1.2"), (">=TLSv1", "TLSv1.2"), ("!SSLv2, !SSLv3", "TLSv1.2"),
                                              ("!SSLv2, !SSLv3, !TLSv1, !TLSv1.1, !TLSv1.2", "TLSv1.3"),
                                              (">=TLSv1.2 <=TLSv1.2", "TLSv1.2")])
def test_postfix_protocols_only_raise_the_floor(tmp_path: Path, value: str, floor: str) -> None:
    cmds = _conf(tmp_path, f"smtp_tls_mandatory_protocols = {value}\n")
    assert PostfixView.read(cmds).tls_min_version == floor


def test_protocols_leaving_nothing_is_a_config_error(tmp_path: Path) -> None:
    cmds = _conf(tmp_path, "smtp_tls_mandatory_protocols = !TLSv1.2, !TLSv1.3\n")
    with pytest.raises(PostfixConfigError, match="smtp_tls_mandatory_protocols"):
        PostfixView.read(cmds)


def test_local_domains_default_from_mydestination_and_virtual_lists(tmp_path: Path) -> None:
    """Postfix's local and virtual domains (literal names, .parent for subdomains, a table queried by
    postmap -q) are handed back; relay_domains are not (Postfix would send them on without REQUIRETLS)."""
    from requiretls.relay import agent

    cmds = _conf(tmp_path, "myhostname = mx.example\nmydomain = example\n"
                           "mydestination = $myhostname, localhost.$mydomain, .sub.example\n"
                           f"virtual_mailbox_domains = texthash:{tmp_path}/vdomains\n"
                           "virtual_alias_domains = alias.example\nrelay_domains = relayed.example\n",
                 vdomains="mailbox.example ok\n")
    view = PostfixView.read(cmds)
    for d in ("mx.example", "localhost.example", "a.sub.example", "mailbox.example", "alias.example", "MX.EXAMPLE."):
        assert view.is_local_domain(d), d
    for d in ("relayed.example", "sub.example", "other.example", "example"):
        assert not view.is_local_domain(d), d
    state = agent.AgentSettings(postfix=view)
    rcpts = ["a@mx.example", "b@relayed.example", "c@Mailbox.Example"]
    assert agent._local_recipients(state, rcpts) == {"a@mx.example", "c@mailbox.example"}
    # relay.local_domains, when set, wins over Postfix's lists.
    toml = agent.AgentSettings(postfix=view, local_domains=frozenset({"relayed.example"}))
    assert agent._local_recipients(toml, rcpts) == {"b@relayed.example"}


def test_global_concurrency_limit_key(tmp_path: Path) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text("[relay]\nconcurrency_limit = 64\npostfix_settings = false\n")
    assert agent_state(load(str(cfg))).settings.max_parallel == 64
    cfg.write_text("")
    assert agent_state(load(str(cfg))).settings.max_parallel == 32


def test_exclude_ciphers_remove_suites_mandatory_only_where_tls_is_mandatory(tmp_path: Path) -> None:
    from requiretls.dest.session import pkix_context, unverified_context
    from requiretls.relay.cli import send_settings
    from requiretls.relay.deliver import opportunistic_settings

    cmds = _conf(tmp_path, "smtp_tls_exclude_ciphers = CHACHA20\n"
                           "smtp_tls_mandatory_exclude_ciphers = AES128, aNULL\n")
    view = PostfixView.read(cmds)
    assert view.tls_exclude_ciphers == ("CHACHA20",)
    assert view.tls_mandatory_exclude_ciphers == ("AES128", "aNULL")
    cfg = tmp_path / "r.toml"
    cfg.write_text("")
    send = send_settings(load(str(cfg)).relay, view)

    def suites(ctx: object) -> set[str]:
        return {c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"}  # type: ignore[attr-defined]

    default = suites(unverified_context())
    assert any("CHACHA20" in c for c in default) and any("AES128" in c for c in default)
    for ctx in (pkix_context(send), unverified_context(send)):  # REQUIRETLS: both lists
        got = suites(ctx)
        assert got and got < default
        assert not any("CHACHA20" in c or "AES128" in c for c in got), got
    # Opportunistic TLS (TLS-Required: No) keeps only the list for every level, as Postfix does.
    loose = suites(unverified_context(opportunistic_settings(send)))
    assert not any("CHACHA20" in c for c in loose) and any("AES128" in c for c in loose)


def test_exclude_ciphers_leaving_nothing_is_a_configuration_error(tmp_path: Path) -> None:
    from requiretls.relay.cli import send_settings

    view = PostfixView.read(_conf(tmp_path, "smtp_tls_mandatory_exclude_ciphers = ALL\n"))
    cfg = tmp_path / "r.toml"
    cfg.write_text("")
    with pytest.raises(PostfixConfigError, match="smtp_tls_mandatory_exclude_ciphers = ALL"):
        send_settings(load(str(cfg)).relay, view)


def test_opportunistic_protocols_and_ciphers_from_main_cf_apply_to_opt_out_sessions_only(tmp_path: Path) -> None:
    from requiretls.relay.cli import send_settings
    from requiretls.relay.deliver import opportunistic_settings

    view = PostfixView.read(_conf(tmp_path, "smtp_tls_protocols = !SSLv2, !SSLv3, !TLSv1, !TLSv1.1, !TLSv1.2\n"
                                             "smtp_tls_ciphers = high\n"))
    assert view.tls_opportunistic_min_version == "TLSv1.3" and view.tls_opportunistic_high_ciphers
    assert view.tls_min_version == "TLSv1.2" and not view.tls_high_ciphers  # the mandatory ones untouched
    cfg = tmp_path / "r.toml"
    cfg.write_text("")
    send = send_settings(load(str(cfg)).relay, view)
    loose = opportunistic_settings(send)
    assert (send.tls_min_version, send.high_ciphers) == ("TLSv1.2", False)
    assert (loose.tls_min_version, loose.high_ciphers) == ("TLSv1.3", True)
    with pytest.raises(PostfixConfigError, match="smtp_tls_protocols"):
        PostfixView.read(_conf(tmp_path, "smtp_tls_protocols = >=TLSv9\n"))


def test_the_311_precheck_trusts_what_postfix_trusts_and_follows_a_reload(tmp_path: Path) -> None:
    """The pre-check judges what Postfix's own client will find: Postfix's CA file and directory and its EHLO
    name, unless relay.cafile is set (as for the agent's own sessions)."""
    from requiretls.relay.cli import probe_for

    view = PostfixView.read(_conf(tmp_path, "myhostname = mx1.example\nsmtp_tls_CAfile = /pf/ca.pem\n"
                                             "smtp_tls_CApath = /pf/certs\n"))
    cfg = tmp_path / "r.toml"
    cfg.write_text("")
    settings = load(str(cfg))
    probe = probe_for(settings.relay, agent_state(settings, view)).settings
    assert (probe.cafile, probe.capath, probe.helo_name) == ("/pf/ca.pem", "/pf/certs", "mx1.example")
    assert probe.session.capath == "/pf/certs"
    cfg.write_text('[relay]\ncafile = "/toml/ca.pem"\n')
    settings = load(str(cfg))
    probe = probe_for(settings.relay, agent_state(settings, view)).settings
    assert (probe.cafile, probe.capath) == ("/toml/ca.pem", None)
