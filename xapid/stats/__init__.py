"""Metrics engine: round-robin archives of data sources (host, VM and SR statistics)."""
