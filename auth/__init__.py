"""Identities, credentials and access decisions: API keys, passwords, TOTP, JWTs, RBAC."""
