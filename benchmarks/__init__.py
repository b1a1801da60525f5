"""Benchmarks: each writes benchmarks/results/<name>.json (see the module docstrings)."""
