"""The product commands (filled in below)."""
