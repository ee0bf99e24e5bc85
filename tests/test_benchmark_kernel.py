"""The kernel benchmark's CPU-checkable parts: its SFT-shaped targets and its one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from composer_dlm.benchmarks.clocks import parse_samples, summarise
from composer_dlm.benchmarks.kernel import SFT_SHARE, main, make_targets

ROOT = Path(__file__).resolve().parents[1]


def test_sft_targets_put_the_share_of_weighted_rows_on_one_id() -> None:
    g = torch.Generator().manual_seed(0)
    rw = torch.where(torch.rand(4000, generator=g) < 0.5, 1.0, 0.0)
    t = make_targets("sft", rw, 1000, g)
    weighted = t[rw != 0]
    counts = torch.bincount(weighted, minlength=1000)
    assert counts.argmax().item() == 500 and counts.max().item() == round(SFT_SHARE * weighted.numel())
    assert (
        counts.max().item() + counts.sort(descending=True).values[1].item() < weighted.numel()
    )  # the rest spread
    uniform = make_targets("uniform", rw, 1000, g)
    assert torch.bincount(uniform[rw != 0], minlength=1000).max().item() < 20
    with pytest.raises(ValueError):
        make_targets("eos", rw, 1000, g)


def test_bad_input_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Through the script as a user runs it, then the other checks in-process."""
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "kernel", "--targets", "uniform,eos"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(
        "composer-dlm: error: --targets takes a comma-separated subset of uniform, sft"
    )
    cases = [(["--branches", "torch26"], "--branches")]
    if not torch.cuda.is_available():
        cases.append(([], "needs a CUDA GPU"))
    for args, needle in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("composer-dlm: error: ") and err.count("\n") == 1
        assert needle in err


def test_clock_samples_keep_our_gpu_and_count_the_power_cap() -> None:
    text = "\n".join(
        [
            "GPU-aaa, 1980, 0x0000000000000000",
            "GPU-bbb, 345, 0x0000000000000001",
            "GPU-aaa, 1620, 0x0000000000000004",
            "GPU-aaa, [N/A], 0x0000000000000004",
            "GPU-aaa, 1500, 0x0000000000000005",
            "a line that is not a sample",
        ]
    )
    assert parse_samples(text, "GPU-aaa") == [(1980, 0), (1620, 4), (1500, 5)]
    assert parse_samples(text, "GPU-zzz") == []  # two GPUs answered, none of them ours
    assert parse_samples("GPU-bbb, 345, 0x1\nGPU-bbb, 1980, 0x4", None) == [(345, 1), (1980, 4)]
    summary = summarise([(1980, 0), (1620, 4), (1500, 5)])
    assert summary is not None
    assert summary["sm_mhz"]["median"] == 1620 and summary["sm_mhz"]["min"] == 1500
    assert summary["power_capped_share"] == 2 / 3  # bit 0x4 set in 0x4 and 0x5
    assert summarise([]) is None
