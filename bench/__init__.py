"""Parley's benchmark suite: `make bench` and `make bench-quick` (see bench/run.py)."""
