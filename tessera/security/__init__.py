"""Security checks run by `make security` (static analysis, secrets, advisories)."""
