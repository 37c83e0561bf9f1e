"""RFC 7672 section 2.1.1: the daemons refuse (or warn about) a resolver whose AD bit cannot be trusted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from requiretls.addresses import Endpoint
from requiretls.config import DnsSettings
from requiretls.dest import DestinationResolver, DnsClient, ResolverSettings
from requiretls.errors import ConfigError
from requiretls.runtime import trust_resolver
from tests.dest.support import FakeDns


@pytest.fixture
def fake() -> Iterator[FakeDns]:
    f = FakeDns()
    yield f
    f.close()


def _resolver(fake: FakeDns, address: str = "127.0.0.1") -> DestinationResolver:
    client = DnsClient(ResolverSettings(address=address, port=fake.port, timeout=0.5, attempts=1))
    return DestinationResolver(client)


def _dns(fake: FakeDns, mode: str = "refuse", named: bool = True) -> DnsSettings:
    return DnsSettings(Endpoint("127.0.0.1", fake.port) if named else None, 0.5, mode)


def test_validating_loopback_resolver_passes(fake: FakeDns, caplog: pytest.LogCaptureFixture) -> None:
    fake.empty(".", "DNSKEY", ad=True)
    with caplog.at_level(logging.INFO, "requiretls"):
        asyncio.run(trust_resolver(_resolver(fake), _dns(fake)))
    assert "resolver_check=validating" in caplog.text


def test_non_validating_resolver_is_refused_naming_the_key(fake: FakeDns) -> None:
    fake.empty(".", "DNSKEY", ad=False)
    with pytest.raises(ConfigError) as e:
        asyncio.run(trust_resolver(_resolver(fake), _dns(fake), "/etc/requiretls/requiretls.toml"))
    assert e.value.key == "dns.untrusted_resolver"
    assert "does not validate" in str(e.value) and str(e.value).startswith("/etc/requiretls/requiretls.toml")


def test_non_validating_resolver_with_warn_runs_and_says_so(fake: FakeDns, caplog: pytest.LogCaptureFixture) -> None:
    fake.empty(".", "DNSKEY", ad=False)
    with caplog.at_level(logging.WARNING, "requiretls"):
        asyncio.run(trust_resolver(_resolver(fake), _dns(fake, "warn")))
    assert "UNTRUSTED, running anyway" in caplog.text


def test_silent_resolver_is_logged_not_refused(fake: FakeDns, caplog: pytest.LogCaptureFixture) -> None:
    fake.drop(".", "DNSKEY")
    with caplog.at_level(logging.WARNING, "requiretls"):
        asyncio.run(trust_resolver(_resolver(fake), _dns(fake)))
    assert "no answer now" in caplog.text


def test_default_resolver_off_loopback_is_refused_without_asking_it(fake: FakeDns) -> None:
    """resolv.conf's first nameserver on another host: refused before any packet leaves loopback."""
    resolver = _resolver(fake, address="192.0.2.53")
    with pytest.raises(ConfigError) as e:
        asyncio.run(trust_resolver(resolver, _dns(fake, named=False)))
    assert "192.0.2.53, is not on loopback" in str(e.value)
    assert fake.queries == []
