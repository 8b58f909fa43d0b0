"""Metrics: plain per-worker counters on the hot path, read only when stats or a scrape asks."""
