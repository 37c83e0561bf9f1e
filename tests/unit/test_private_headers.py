"""Our private header fields: one definition of the names, the route value and the hand-back list, read by the
agent exactly as the milter wrote it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from requiretls.policy.headers import (
    HANDBACK_HEADER,
    ROUTE_HEADER,
    format_handback,
    header_values,
    parse_handback,
    parse_header_block,
    route_value,
)
from requiretls.policy.route import RcptRoute, Route, handback, with_route

# Local parts as RFC 5321 §4.1.2 allows them, quoted ones with the characters a naive parse trips on.
LOCALS = st.one_of(
    st.from_regex(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,12}", fullmatch=True),
    st.builds(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"',
              st.text(st.sampled_from('ab <>,"\\@'), min_size=1, max_size=8)),
)
ADDRESSES = st.builds(lambda lp, d: f"{lp}@{d}", LOCALS,
                      st.sampled_from(["a.example", "b.test", "xn--bcher-kva.example"]))


@given(st.lists(ADDRESSES, max_size=5))
def test_handback_list_round_trips_through_a_header_block(addresses: list[str]) -> None:
    raw = f"Subject: x\n{HANDBACK_HEADER}: {format_handback(addresses)}\n\nbody\n".encode()
    assert parse_handback(header_values(parse_header_block(raw), HANDBACK_HEADER)) == tuple(addresses)


def test_quoted_local_part_with_angle_bracket_is_one_address() -> None:
    value = format_handback(['"a>b"@x.example', "c@y.example"])
    assert value == '<"a>b"@x.example>, <c@y.example>'
    assert parse_handback([value]) == ('"a>b"@x.example', "c@y.example")


def test_handback_parse_reads_old_queue_files_and_folded_values() -> None:
    """Messages queued by an earlier version carry the same ``<a>, <b>`` form, possibly folded."""
    assert parse_handback(["<u@me.example>,\n <c@t.example>", "<d@x.example>"]) == (
        "u@me.example", "c@t.example", "d@x.example")


def test_handback_parse_drops_an_unclosed_bracket() -> None:
    assert parse_handback(["<a@x.example>, <b@y.example"]) == ("a@x.example",)


def test_route_value_is_the_first_route_field_unfolded() -> None:
    assert route_value([("Subject", "x"), ("x-requiretls-route", " relay-optout\n "), (ROUTE_HEADER, "relay")]) == (
        "relay-optout")
    assert route_value([("Subject", "x")]) is None


def test_with_route_writes_what_the_agent_reads() -> None:
    from requiretls.policy import Envelope, LocalPolicy, MessageFacts, decide

    rcpts = [RcptRoute("b@d.example", "smtp", None), RcptRoute('"x>y"@me.example', "local", "me.example")]
    d = decide(MessageFacts(Envelope("a@s.example", tuple(r.address for r in rcpts), ("REQUIRETLS",))), LocalPolicy())
    edits = with_route(d, Route.RELAY, handback(rcpts)).header_edits
    block = "".join(f"{e.name}: {e.value}\n" for e in edits if e.action == "add") + "\n"
    headers = parse_header_block(block.encode())
    assert route_value(headers) == "relay"
    assert parse_handback(header_values(headers, HANDBACK_HEADER)) == ('"x>y"@me.example',)
