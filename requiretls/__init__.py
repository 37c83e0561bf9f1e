"""requiretls: RFC 8689 REQUIRETLS and ``TLS-Required: No`` for Postfix."""

__version__ = "0.1.0"
