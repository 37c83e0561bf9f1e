"""The opt-out loop: find mail that Postfix defers because of TLS policy (``requiretls queue``), tell local and
authenticated senders how to opt out (``requiretls notify``), and let the postmaster release a message with
``TLS-Required: No`` (``requiretls release QUEUEID --optout``)."""
