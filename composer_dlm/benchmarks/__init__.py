"""Benchmarks run through `python scripts/benchmark.py NAME`; each module exposes `main(argv)`."""

from __future__ import annotations


def int_list(text: str) -> list[int]:
    """argparse type of a comma-separated list of integers ('1,16'; empty items ignored)."""
    return [int(v) for v in text.split(",") if v]
