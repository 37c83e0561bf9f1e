"""The REQUIRETLS delivery agent for Postfix < 3.11 (and the re-injection path for rule-tagged mail on 3.11+)."""
