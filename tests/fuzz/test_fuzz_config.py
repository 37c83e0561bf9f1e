"""The policy tables (smtp_tls_policy_maps syntax + our attributes) and the TOML configuration: on any input
either a parsed result or a ConfigError naming the file, never another exception."""

from __future__ import annotations

import contextlib
import json

from hypothesis import given
from hypothesis import strategies as st

from requiretls import config
from requiretls.errors import ConfigError
from requiretls.policy.table import PolicyTable

from .support import FUZZ, SEPARATORS, tokens

TABLE_WORDS = ["example.com", ".example.net", "[relay.example]:587", "relay:25", "user@example.com", "@example.org",
               "<>", "bob@", "dane", "dane-only", "secure", "may", "encrypt", "verify", "none", "fingerprint",
               "optout=yes", "optout=no", "optout=maybe", "requiretls=yes", "requiretls=no", "match=nexthop",
               "match=", "protocols=>=TLSv1.3", "ciphers=high", "servername=hostname", "tafile=/x", "=", "#",
               "xn--bcher-kva.example", "Ä.example", "..", "[", "]", " ", "\n", "\n\t", "\r\n", "\\\n", *SEPARATORS]


@FUZZ
@given(st.one_of(st.text(max_size=200), tokens(TABLE_WORDS)), st.sampled_from(["destination", "sender"]))
def test_policy_table_parse_raises_only_config_error(text: str, kind: str) -> None:
    try:
        table = PolicyTable.parse(text, "policy", kind)  # type: ignore[arg-type]
    except ConfigError as e:
        assert "policy" in str(e)
        return
    for entry in table:
        table.lookup_domain(entry.key.lstrip("."))
        table.lookup_sender(entry.key)
        table.lookup_nexthop(entry.key)


def _toml_value() -> st.SearchStrategy[str]:
    scalar = st.one_of(
        st.text(max_size=20).map(json.dumps), st.integers(-(2**70), 2**70).map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(repr), st.sampled_from(["true", "false", "nan", "inf"]),
        st.sampled_from(['"127.0.0.0/8"', '"::1/128"', '"unix:/run/x.sock"', '"inet:127.0.0.1:10"', '"0660"',
                         '"127.0.0.1:53"', '"[::1]:53"', '"trusted"', '"any"', '"warn"', '"3.7"', '"[requiretls]"',
                         '"inet:[::1]:1"', '"local:/x"', '"x:y:z"', '"[::1"', '"a:99999999999"']),
    )
    return st.recursive(scalar, lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2).map(
            lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}"),
    ), max_leaves=6)


@st.composite
def toml_documents(draw: st.DrawFn) -> str:
    lines = []
    sections = [*config.SCHEMA, "bogus"]
    for section in draw(st.lists(st.sampled_from(sections), unique=True, max_size=4)):
        lines.append(f"[{section}]")
        keys = [*config.SCHEMA.get(section, {}), "nokey"]
        for key in draw(st.lists(st.sampled_from(keys), unique=True, max_size=4)):
            lines.append(f"{key} = {draw(_toml_value())}")
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=20)))
    return "\n".join(lines)


@FUZZ
@given(st.one_of(toml_documents(), st.text(max_size=200), tokens(["[policy]", "[dns]", "= ", '"', "'", "[[", "]]",
                                                                 "{", "}", "table", *SEPARATORS])))
def test_config_parse_raises_only_config_error(text: str) -> None:
    try:
        values = config.parse(text, "requiretls.toml")
    except ConfigError as e:
        assert "requiretls.toml" in str(e)
        return
    with contextlib.suppress(ConfigError):
        config.build_local_policy(values, "requiretls.toml", text)
