"""The optional SMTP front for Postfix < 3.11: receives REQUIRETLS for smtpd."""
