"""Per-family layer math."""
