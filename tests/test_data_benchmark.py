"""The loader benchmark runs end to end on tiny synthetic shards and reports sane figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from composer_dlm.benchmarks.loader import main, target_sequences_per_second
from composer_dlm.data.embedded import CACHE_ENV


def test_target_matches_a_hand_count() -> None:
    # 1.65B shape: per block 2*2048 + 4*2048^2 + 3*2048*5632 = 51,384,320 parameters; 22 blocks + ln_f + the
    # output projection 126464*2048 = 1,389,455,360 (no input embedding). Per token 3 * (2 * that +
    # 4 * 22 * 2048 * 4096) = 1.05508e10 FLOPs; 0.5 * 989e12 / (4096 * 1.05508e10) = 11.442 sequences/s.
    assert target_sequences_per_second() == pytest.approx(11.442, abs=0.001)


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
    results = main([*args, "--batch-size", "4", "--out", str(tmp_path / "loader.json")])
    assert [(r["mode"], r["num_workers"]) for r in results] == [("pretrain", 0), ("sft", 0)]
    assert all(r["seqs_per_s"] > 0 and r["tokens_per_s"] >= r["seqs_per_s"] for r in results)
    assert "x target" in capsys.readouterr().out
    raw = json.loads((tmp_path / "loader.json").read_text())
    assert raw["results"] == results and raw["environment"]["torch"] == torch.__version__
    assert raw["environment"]["torch27_branch_forced"] is False


def test_startup_data_benchmark_measures_each_verify_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`startup data` writes hashed synthetic shards of the asked size and builds the loader with each setting;
    the JSON holds every build's seconds and the command that reproduces it."""
    from composer_dlm.benchmarks import startup

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    out = tmp_path / "startup.json"
    startup.main(["data", "--sizes-gib", "0.001", "--seq-len", "64", "--repeats", "2", "--out", str(out)])
    raw = json.loads(out.read_text())
    assert raw["command"] == "python scripts/benchmark.py startup data --repeats 2 --sizes-gib 0.001"
    (row,) = raw["results"]
    assert row["samples"] == 2**30 // 1000 // (4 * 64) and row["shards"] == 1
    labels = ["first_start_quick", "second_start_quick", "every_start_full", "every_start_off"]
    assert sorted(row["runs_s"]) == sorted(labels)
    assert all(len(row["runs_s"][k]) == 2 and row[f"{k}_s"] > 0 for k in labels)
    assert "2nd start s" in capsys.readouterr().out
