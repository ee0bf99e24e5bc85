"""Benchmarks run through `python scripts/benchmark.py NAME`; each module exposes `main(argv)`."""
