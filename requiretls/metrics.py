"""The one metrics scheme of the three daemons (docs/monitoring.md), served by each on its own loopback port.

Names: ``requiretls_<daemon>_<what>`` with ``<daemon>`` one of ``milter``, ``relay``, ``policyd``; counters end in
``_total``, durations in ``_seconds``; label values come from small fixed sets (never an address or a domain),
so that the number of series stays bounded.  Every daemon also exports ``requiretls_build_info`` (constant 1,
labels ``daemon``, ``version``, ``python``) and the ``process_*`` families of prometheus_client.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from requiretls import __version__

#: Enhanced status codes (RFC 3463) as label values; anything else is ``other``.
_DSN = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def dsn_label(dsn: str) -> str:
    return dsn if _DSN.fullmatch(dsn) else "other"


#: The resolver check at start (requiretls.runtime.trust_resolver): 1 validating, 0 not trusted, -1 not known.
_resolver = [-1.0]


def resolver_validating(state: bool | None) -> None:
    _resolver[0] = -1.0 if state is None else float(state)


class _Resolver(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("requiretls_resolver_validating",
                                "the DNS resolver check at start: 1 validating (AD bit trusted), 0 not trusted, "
                                "-1 no answer yet or no check", value=_resolver[0])


def registry(daemon: str) -> CollectorRegistry:
    """A registry with the families every daemon exports."""
    reg = CollectorRegistry()
    ProcessCollector(registry=reg)
    info = Gauge("requiretls_build_info", "requiretls build: constant 1, the version in labels",
                 ["daemon", "version", "python"], registry=reg)
    info.labels(daemon, __version__, platform.python_version()).set(1)
    reg.register(_Resolver())
    return reg


def serve(reg: CollectorRegistry, address: str) -> None:
    """Expose /metrics on ``HOST:PORT`` (``[IPv6]:PORT``) in a daemon thread."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=reg)
