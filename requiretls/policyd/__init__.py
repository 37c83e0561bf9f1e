"""The TLS policy service: a socketmap server for Postfix's smtp_tls_policy_maps and smtp_requiretls_policy."""
