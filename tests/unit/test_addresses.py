"""requiretls.addresses: next hops with Postfix's semantics (smtp(8) "SMTP DESTINATION SYNTAX"), endpoints and
the one listen syntax of every daemon."""

from __future__ import annotations

import pytest

from requiretls.addresses import Backend, Endpoint, ListenAddress, NextHop


@pytest.mark.parametrize(
    ("text", "host", "port", "mx"),
    [
        # smtp(8): domainname[:port] -> MX lookup; [hostname][:port] -> the host's addresses; port default smtp
        ("example.com", "example.com", 25, True),
        ("Example.COM.", "example.com", 25, True),
        ("example.com:587", "example.com", 587, True),
        ("[smtp.example.com]", "smtp.example.com", 25, False),
        ("[smtp.example.com]:587", "smtp.example.com", 587, False),
        ("[smtp.example.com]:", "smtp.example.com", 25, False),  # host_port(3): "[host]:" is the default port
        ("[smtp.example.com]:submission", "smtp.example.com", 587, False),
        ("example.com:smtp", "example.com", 25, True),
        ("[192.0.2.1]", "192.0.2.1", 25, False),
        ("[192.0.2.1]:2525", "192.0.2.1", 2525, False),
        ("[ipv6:2001:db8::1]", "2001:db8::1", 25, False),
        ("[IPv6:2001:DB8:0::1]:587", "2001:db8::1", 587, False),
        ("[2001:db8::1]:587", "2001:db8::1", 587, False),  # Postfix reads a bare IPv6 address in brackets too
        (" [mx.example.net]:25 ", "mx.example.net", 25, False),
    ],
)
def test_next_hop_forms_parse_as_postfix_reads_them(text: str, host: str, port: int, mx: bool) -> None:
    hop = NextHop.parse(text)
    assert (hop.host, hop.port, hop.mx) == (host, port, mx)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("[example.com]:25", "[example.com]", True),
        ("[EXAMPLE.com.]", "[example.com]:smtp", True),
        ("example.com", "example.com:25", True),
        ("example.com", "[example.com]", False),  # MX lookup vs. the host itself
        ("[example.com]:25", "example.com", False),
        ("[example.com]:587", "[example.com]", False),
        ("[ipv6:2001:db8::1]", "[2001:db8:0:0::1]:25", True),
    ],
)
def test_next_hop_equality_is_postfix_semantics(a: str, b: str, same: bool) -> None:
    assert (NextHop.parse(a) == NextHop.parse(b)) is same
    if same:
        assert hash(NextHop.parse(a)) == hash(NextHop.parse(b))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("[example.com", "missing ']'"),
        ("[example.com]x", "garbage after ']'"),
        ("[example.com]:0", "1 to 65535"),
        ("example.com:65536", "1 to 65535"),
        ("example.com:25x", "1 to 65535"),
        ("example.com:imap", "1 to 65535"),
        ("192.0.2.1", "in brackets"),  # an address is written [192.0.2.1]
        ("192.0.2.1:25", "in brackets"),
        ("2001:db8::1", "[ipv6:"),
        ("[ipv6:not-an-address]", "malformed IPv6"),
        ("exa mple.com", "not a host name"),
        ("-bad.example", "not a host name"),
        ("[under_score..example]", "not a host name"),
    ],
)
def test_bad_next_hops_are_refused_with_the_reason(text: str, needle: str) -> None:
    with pytest.raises(ValueError) as exc:
        NextHop.parse(text)
    assert needle in str(exc.value)


@pytest.mark.parametrize(
    ("text", "written"),
    [
        ("example.com", "example.com"),
        ("example.com:587", "example.com:587"),
        ("[example.com]:25", "[example.com]"),
        ("[example.com]:587", "[example.com]:587"),
        ("[2001:db8::1]:587", "[ipv6:2001:db8::1]:587"),
        ("[192.0.2.1]", "[192.0.2.1]"),
    ],
)
def test_next_hop_is_written_in_postfix_form(text: str, written: str) -> None:
    assert str(NextHop.parse(text)) == written
    assert NextHop.parse(str(NextHop.parse(text))) == NextHop.parse(text)


def test_an_address_literal_has_no_mx_lookup() -> None:
    assert NextHop.parse("[192.0.2.1]").literal and not NextHop.parse("[mx.example]").literal
    with pytest.raises(ValueError, match="no MX"):
        NextHop("192.0.2.1", 25, mx=True)


@pytest.mark.parametrize(
    ("text", "default", "host", "port"),
    [
        ("127.0.0.1", 53, "127.0.0.1", 53),
        ("127.0.0.1:5353", 53, "127.0.0.1", 5353),
        ("::1", 53, "::1", 53),
        ("[::1]:5353", None, "::1", 5353),
        ("[2001:db8::1]", 53, "2001:db8::1", 53),
    ],
)
def test_endpoint_forms(text: str, default: int | None, host: str, port: int) -> None:
    assert Endpoint.parse(text, default) == Endpoint(host, port)


@pytest.mark.parametrize(
    ("text", "default", "needle"),
    [
        ("resolver.example", 53, "is not IP"),
        ("127.0.0.1", None, "has no port"),
        ("127.0.0.1:0", 53, "1 to 65535"),
        ("127.0.0.1:99999", 53, "1 to 65535"),
        ("[::1]:x", 53, "1 to 65535"),
    ],
)
def test_bad_endpoints_are_refused(text: str, default: int | None, needle: str) -> None:
    with pytest.raises(ValueError) as exc:
        Endpoint.parse(text, default)
    assert needle in str(exc.value)


@pytest.mark.parametrize(
    ("text", "canonical", "libmilter", "legacy"),
    [
        ("unix:/run/requiretls/m.sock", "unix:/run/requiretls/m.sock", "unix:/run/requiretls/m.sock", False),
        ("inet:127.0.0.1:8891", "inet:127.0.0.1:8891", "inet:8891@127.0.0.1", False),
        ("inet:[::1]:8891", "inet:[::1]:8891", "inet6:8891@::1", False),
        # the old forms: libmilter's inet:PORT@HOST and local:, read with a warning
        ("inet:8891@127.0.0.1", "inet:127.0.0.1:8891", "inet:8891@127.0.0.1", True),
        ("inet6:8891@::1", "inet:[::1]:8891", "inet6:8891@::1", True),
        ("inet:8891", "inet:127.0.0.1:8891", "inet:8891@127.0.0.1", True),  # loopback, never all interfaces
        ("local:/run/m.sock", "unix:/run/m.sock", "unix:/run/m.sock", True),
    ],
)
def test_one_listen_syntax_and_the_old_forms(text: str, canonical: str, libmilter: str, legacy: bool) -> None:
    a = ListenAddress.parse(text)
    assert (str(a), a.libmilter(), a.legacy) == (canonical, libmilter, legacy)
    assert ListenAddress.parse(canonical) == a and not ListenAddress.parse(canonical).legacy


@pytest.mark.parametrize(
    "text",
    ["unix:relative.sock", "unix:", "unix:/dir/", "tcp:127.0.0.1:25", "127.0.0.1:25", "inet:example.com:25",
     "inet:127.0.0.1", "inet:127.0.0.1:70000", "inet:70000@127.0.0.1", "inet:25@example.com", "inet6:[::1]:25",
     "inet:::1:25"],
)
def test_bad_listen_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        ListenAddress.parse(text)


@pytest.mark.parametrize(
    ("text", "postfix"),
    [
        ("unix:/var/spool/postfix/requiretls/m.sock", "unix:requiretls/m.sock"),
        ("unix:/run/m.sock", "unix:/run/m.sock"),
        ("inet:127.0.0.1:8891", "inet:127.0.0.1:8891"),
        ("inet:[::1]:8891", "inet:[::1]:8891"),
    ],
)
def test_listen_address_in_postfix_form(text: str, postfix: str) -> None:
    assert ListenAddress.parse(text).postfix("/var/spool/postfix") == postfix


@pytest.mark.parametrize(("text", "endpoint", "path", "service"), [
    ("127.0.0.1", Endpoint("127.0.0.1", 10028), "", None),
    ("[::1]:2525", Endpoint("::1", 2525), "", None),
    ("unix:public/requiretls-front", None, "/var/spool/postfix/public/requiretls-front", ("requiretls-front", False)),
    ("unix:private/x.y", None, "/var/spool/postfix/private/x.y", ("x.y", True)),
    ("unix:/var/spool/postfix/public/f", None, "/var/spool/postfix/public/f", ("f", False)),
    ("unix:/run/front.sock", None, "/run/front.sock", None),
    ("unix:public/a/b", None, "/var/spool/postfix/public/a/b", None),
])
def test_front_backend_forms(text: str, endpoint: Endpoint | None, path: str,
                             service: tuple[str, bool] | None) -> None:
    b = Backend.parse(text, 10028)
    assert b.endpoint == endpoint
    if endpoint is None:
        assert b.socket_path("/var/spool/postfix") == path
        assert b.master_service("/var/spool/postfix") == service
        assert Backend.parse(str(b)) == b


@pytest.mark.parametrize("text", ["", " ", "unix:", "unix:public/", "unix:public/a b", "unix:../etc/x", "localhost:25",
                                  "192.0.2.1:99999"])
def test_front_backend_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Backend.parse(text, 10028)
