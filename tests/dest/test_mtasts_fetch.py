"""The MTA-STS fetcher's rules (RFC 8461 section 3.3) against a real HTTPS server with a test CA: no redirect
followed, the 64 KiB cap whatever the framing, media type, the overall timeout, our own addresses with SNI and
the certificate name ``mta-sts.DOMAIN``."""

from __future__ import annotations

import pytest

from requiretls.dest.errors import (
    MtaStsMediaTypeError,
    MtaStsPolicyError,
    MtaStsRedirectError,
    MtaStsTimeoutError,
    MtaStsTlsError,
    MtaStsTooLargeError,
)
from requiretls.dest.mtasts import PolicyFetcher, StsSettings

from .support import HttpAnswer, PolicyServer, policy_text, run

CAP = 65536


def _fetch(server: PolicyServer, cafile: str, domain: str = "good.test",
           addresses: tuple[str, ...] = ("127.0.0.1",), timeout: float = 5.0) -> str:
    settings = StsSettings(cafile=cafile, https_port=server.port, fetch_timeout=timeout)
    return run(PolicyFetcher().fetch_text(domain, addresses, settings))


def _serve(server: PolicyServer, answer: HttpAnswer, domain: str = "good.test") -> None:
    server.answers[f"mta-sts.{domain}"] = answer


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_an_error_and_its_target_is_never_requested(policy_server: PolicyServer,
                                                                cafile: str, status: int) -> None:
    """RFC 8461 section 3.3: "HTTP 3xx redirects MUST NOT be followed"."""
    _serve(policy_server, HttpAnswer(status, b"", headers=[("Location", "https://mta-sts.other.test/x")]))
    _serve(policy_server, HttpAnswer(body=policy_text()), "other.test")
    with pytest.raises(MtaStsRedirectError, match=str(status)):
        _fetch(policy_server, cafile)
    assert policy_server.requests == [("mta-sts.good.test", "/.well-known/mta-sts.txt")]


@pytest.mark.parametrize("framing", ["length", "chunked", "no_length"])
def test_body_of_exactly_the_cap_is_accepted(policy_server: PolicyServer, cafile: str,
                                             framing: str) -> None:
    body = policy_text()
    body += b"#" * (CAP - len(body))
    _serve(policy_server, HttpAnswer(body=body, chunked=framing == "chunked", no_length=framing == "no_length"))
    assert len(_fetch(policy_server, cafile).encode()) == CAP


@pytest.mark.parametrize("framing", ["length", "chunked", "no_length"])
def test_body_one_byte_over_the_cap_is_refused(policy_server: PolicyServer, cafile: str,
                                               framing: str) -> None:
    """RFC 8461 section 3.3 suggests a cap of 64 KiB on the policy."""
    body = policy_text()
    body += b"#" * (CAP + 1 - len(body))
    _serve(policy_server, HttpAnswer(body=body, chunked=framing == "chunked", no_length=framing == "no_length"))
    with pytest.raises(MtaStsTooLargeError):
        _fetch(policy_server, cafile)


@pytest.mark.parametrize("framing", ["chunked", "no_length"])
def test_endless_body_stops_at_the_cap_instead_of_reading_on(policy_server: PolicyServer,
                                                             cafile: str, framing: str) -> None:
    """A body that never ends is refused for its size as soon as the cap is passed, long before the timeout:
    the reader stops at the cap instead of buffering what the server keeps sending."""
    _serve(policy_server, HttpAnswer(endless=True, chunked=framing == "chunked", no_length=framing == "no_length"))
    with pytest.raises(MtaStsTooLargeError):
        _fetch(policy_server, cafile, timeout=20.0)


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain; charset=utf-8", "Text/Plain"])
def test_text_plain_is_accepted_with_parameters_and_in_any_case(policy_server: PolicyServer,
                                                                cafile: str, content_type: str) -> None:
    _serve(policy_server, HttpAnswer(body=policy_text(), content_type=content_type))
    assert _fetch(policy_server, cafile) == policy_text().decode()


@pytest.mark.parametrize("content_type", [None, "text/html", "application/octet-stream", "text/plainx", ""])
def test_other_media_types_are_refused(policy_server: PolicyServer, cafile: str,
                                       content_type: str | None) -> None:
    """RFC 8461 section 3.3: the policy is served with media type ``text/plain``."""
    _serve(policy_server, HttpAnswer(body=policy_text(), content_type=content_type))
    with pytest.raises(MtaStsMediaTypeError):
        _fetch(policy_server, cafile)


def test_a_server_that_does_not_answer_in_time_is_a_timeout(policy_server: PolicyServer,
                                                            cafile: str) -> None:
    _serve(policy_server, HttpAnswer(body=policy_text(), delay=2.0))
    with pytest.raises(MtaStsTimeoutError):
        _fetch(policy_server, cafile, timeout=0.5)


def test_a_body_that_trickles_in_is_cut_by_the_overall_timeout(policy_server: PolicyServer,
                                                               cafile: str) -> None:
    """The timeout covers the whole fetch, not each read: 100 bytes every 0.1 s would take a minute to fill."""
    _serve(policy_server, HttpAnswer(body=b"#" * 100, endless=True, no_length=True, pause=0.1))
    with pytest.raises(MtaStsTimeoutError):
        _fetch(policy_server, cafile, timeout=0.5)


def test_sni_is_the_policy_host_while_connecting_to_our_own_address(policy_server: PolicyServer,
                                                                    cafile: str) -> None:
    """RFC 8461 section 3.3: SNI ``mta-sts.DOMAIN``.  The name resolves nowhere but in our DNS client's answer
    (``.test``), so a success also shows the client used the address it was given, not the system resolver."""
    _serve(policy_server, HttpAnswer(body=policy_text()))
    assert _fetch(policy_server, cafile) == policy_text().decode()
    assert policy_server.sni_names == ["mta-sts.good.test"]
    assert policy_server.requests == [("mta-sts.good.test", "/.well-known/mta-sts.txt")]


def test_certificate_must_name_the_policy_host(policy_server: PolicyServer, cafile: str) -> None:
    """RFC 8461 section 3.3: the certificate must be valid for ``mta-sts.DOMAIN``, whatever address we used."""
    _serve(policy_server, HttpAnswer(body=policy_text()), "unnamed.test")
    with pytest.raises(MtaStsTlsError, match="certificate"):
        _fetch(policy_server, cafile, "unnamed.test")
    assert policy_server.requests == []


def test_an_unreachable_address_moves_on_to_the_next(policy_server: PolicyServer,
                                                     cafile: str) -> None:
    _serve(policy_server, HttpAnswer(body=policy_text()))
    assert _fetch(policy_server, cafile, addresses=("127.0.0.2", "127.0.0.1")) == policy_text().decode()


def test_body_that_is_not_utf8_is_a_policy_error(policy_server: PolicyServer,
                                                 cafile: str) -> None:
    _serve(policy_server, HttpAnswer(body=policy_text() + b"\xff\xfe"))
    with pytest.raises(MtaStsPolicyError, match="UTF-8"):
        _fetch(policy_server, cafile)
