"""Helpers the test suites and the benchmarks share (server/tests, operator/tests, e2e/,
bench/), each written once. Not part of the installed distribution: the test runs put the
repository root on the path (pyproject.toml's pytest ``pythonpath``), `python -m e2e...`
runs from it, and the bench scripts add it themselves."""
