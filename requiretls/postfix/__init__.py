"""Postfix version detection and the generated main.cf / master.cf / header_checks for that version."""
