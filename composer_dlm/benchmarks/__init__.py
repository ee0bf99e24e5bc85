"""Every benchmark of the project, run through ``python scripts/benchmark.py NAME``; each module has ``main(argv)``.

Each writes its raw figures as JSON (``--out``) together with :func:`environment`: the device, the torch and
Triton versions and which torch-2.7 branches ran (forced with COMPOSER_DLM_FORCE_TORCH27=1 or not), so that a
figure says what it was measured on. Small results meant for the README are committed under ``results/``.
"""

from __future__ import annotations

import json
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).parent / "results"
H200_PEAK_FLOPS = (
    989e12  # dense bf16 peak of one H200 (the MFU denominator); its matrix work peaks near 790e12
)


def int_list(text: str) -> list[int]:
    """argparse type of a comma-separated list of integers ('1,16'; empty items ignored)."""
    return [int(v) for v in text.split(",") if v]


def repeats(values: Sequence[float]) -> dict[str, Any]:
    """A figure measured ``len(values)`` times, as the raw JSON keeps it: every value, their median and range."""
    assert values, "no repeat to summarise"
    return {
        "repeats": list(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def environment() -> dict[str, Any]:
    """What a figure was measured on: device, versions, and whether the torch-2.7 branches were forced."""
    from kernels.masked_ce import forced_torch27

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name()
        if cuda
        else f"CPU ({platform.processor() or platform.machine()})",
        "num_gpus": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "torch27_branch_forced": forced_torch27(),
    }


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """``payload`` plus ``environment`` as indented JSON at ``path`` (folders made as needed)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(), **payload}, indent=1) + "\n")
    return out
