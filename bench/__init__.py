"""Benchmarks: each module has run() -> dict of measured figures."""
