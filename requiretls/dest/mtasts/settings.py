"""Tunables of MTA-STS discovery, fetching and caching (RFC 8461 section 3.3 suggestions)."""

from __future__ import annotations

from dataclasses import dataclass

from .parse import MAX_AGE_LIMIT


@dataclass(frozen=True)
class StsSettings:
    """Tunables of MTA-STS discovery and fetching (RFC 8461 section 3.3 suggestions)."""

    cafile: str | None = None  # None: the system trust store
    fetch_timeout: float = 30.0
    max_body_size: int = 65536
    max_header_size: int = 16384
    https_port: int = 443
    max_age_limit: int = MAX_AGE_LIMIT
    retry_after_failure: float = 300.0
    refresh_interval: float = 86400.0
    refresh_margin: float = 3600.0
    user_agent: str = "requiretls-mta-sts/1"
