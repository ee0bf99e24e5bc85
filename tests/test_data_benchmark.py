"""The loader benchmark runs end to end on tiny synthetic shards and reports sane figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from composer_dlm.data.benchmark import main, target_sequences_per_second
from composer_dlm.data.embedded import CACHE_ENV


def test_target_matches_the_issue_figure() -> None:
    # 0.5 * 989e12 / (6 * 1.65e9 * 4096) = 12.19 sequences/s, about 50k tokens/s
    assert target_sequences_per_second() == pytest.approx(12.19, abs=0.01)
    assert target_sequences_per_second() * 4096 == pytest.approx(49_940, rel=1e-3)


def test_benchmark_runs_on_tiny_synthetic_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    args = [
        "--seq-len",
        "64",
        "--num-samples",
        "32",
        "--batches",
        "12",
        "--warmup",
        "1",
        "--num-workers",
        "0",
    ]
    results = main([*args, "--batch-size", "4"])
    assert [(r["mode"], r["num_workers"]) for r in results] == [("pretrain", 0), ("sft", 0)]
    assert all(r["seqs_per_s"] > 0 and r["tokens_per_s"] >= r["seqs_per_s"] for r in results)
    assert "x target" in capsys.readouterr().out
