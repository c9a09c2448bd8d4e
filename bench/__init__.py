"""Benchmark scripts: each runs from the repository root as ``python -m bench.NAME`` (see BENCHMARKS.md)."""
