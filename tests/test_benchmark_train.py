"""The training benchmark's code path (real trainer + reference step) runs end to end on a tiny CPU model."""

from __future__ import annotations

import json

import pytest

from composer_dlm.benchmarks import train as bench
from composer_dlm.models.llada import LLaDAConfig


def test_train_benchmark_runs_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CDLM_BENCH_DATA", str(tmp_path / "data"))
    out = tmp_path / "result.json"
    bench.main(
        [
            "--d-model",
            "32",
            "--n-layers",
            "2",
            "--n-heads",
            "2",
            "--mlp",
            "64",
            "--vocab",
            "4096",
            "--seq-len",
            "32",
            "--micro-batches",
            "2,4",
            "--steps",
            "4",
            "--warmup",
            "2",
            "--fsdp",
            "none",
            "--no-compile",
            "--loss-impl",
            "plain",
            "--reference",
            "--out",
            str(out),
        ]
    )
    results = json.loads(out.read_text())
    assert [r["micro_batch"] for r in results] == [2, 4, 4, 8]
    assert all(r["tokens_per_s_per_gpu"] > 0 and not r.get("oom") for r in results)
    # MFU of both paths: the model's training FLOPs per token against the 989 TFLOP/s bf16 peak.
    config = LLaDAConfig(
        d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64, vocab_size=4096, mask_token_id=0
    )
    per_token = config.training_flops(1, 32) / 32
    for r in results:
        assert r["mfu"] == pytest.approx(r["tokens_per_s_per_gpu"] * per_token / 989e12)
        assert r["step_s"] > 0
    assert results[0]["path"].startswith("ours") and results[2]["path"].startswith("reference")
    table = capsys.readouterr().out
    assert table.count("| ours") == 2 and table.count("| reference") == 2
