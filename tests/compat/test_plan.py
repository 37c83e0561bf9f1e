"""What ``postfix-config`` plans for the admin's content filter transport (no testbed needed).  The end-to-end
proof is test_site.py's native REQUIRETLS class on Postfix 3.11 (through amavisd-new once)."""

from __future__ import annotations

import pytest

from requiretls.policy import LocalPolicy
from requiretls.postfix.cli import offline_env
from requiretls.postfix.generate import MasterEntry, PostfixEnv, generate

MILTER = "unix:/var/spool/postfix/requiretls/milter.sock"
RELAY = "unix:/var/spool/postfix/requiretls/relay.sock"
POLICYD = "unix:/var/spool/postfix/requiretls/policyd.sock"
AMAVIS = "amavis unix - - n - 2 smtp -o smtp_data_done_timeout=1200 -o smtp_send_xforward_command=yes"
RETURN = "127.0.0.1:10025 inet n - n - - smtpd -o content_filter= -o receive_override_options=no_milters"


def _master(version: str, policyd: bool, amavis: str = AMAVIS) -> dict[str, MasterEntry]:
    env = offline_env(version)
    env = PostfixEnv(env.version, env.config_directory, env.queue_directory,
                     {**env.current, "content_filter": "amavis:[127.0.0.1]:10024"},
                     master={"amavis/unix": amavis, "127.0.0.1:10025/inet": RETURN})
    plan = generate(env, LocalPolicy(), MILTER, RELAY, "127.0.0.1:10026", POLICYD if policyd else None)
    return {f"{m.service}/{m.type}": m for m in plan.master}


def test_311_with_policyd_makes_the_hop_to_the_filter_opportunistic() -> None:
    m = _master("3.11", policyd=True)["amavis/unix"]
    assert m.adopt
    assert m.line.endswith(AMAVIS.split(" ", 8)[8] + " -o smtp_requiretls_policy=opportunistic")


@pytest.mark.parametrize(("version", "policyd"), [("3.7", True), ("3.10", True), ("3.11", False)])
def test_filter_transport_untouched_where_postfix_default_applies(version: str, policyd: bool) -> None:
    assert "amavis/unix" not in _master(version, policyd)


def test_admins_own_requiretls_policy_on_the_filter_transport_is_kept() -> None:
    assert "amavis/unix" not in _master("3.11", True, AMAVIS + " -o smtp_requiretls_policy=enforce")
