"""The training benchmark's code path (real trainer + reference step) runs end to end on a tiny CPU model."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from composer_dlm import builders
from composer_dlm.benchmarks import train as bench
from composer_dlm.models.llada import LLaDAConfig


def test_train_benchmark_runs_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CDLM_BENCH_DATA", str(tmp_path / "data"))
    # The fused loss through its plain-PyTorch twin (the interpreter is slow; the kernel has its own tests):
    # what is checked here is the benchmark's accounting.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # Each configuration's trainer must be freed before the next one starts (Composer's atexit hook held every
    # trainer's model and optimizer to the end of the process, so a second configuration ran out of memory).
    models: list[weakref.ref] = []
    build_trainer = builders.build_trainer

    def tracked(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        models.append(weakref.ref(trainer.state.model))
        return trainer

    monkeypatch.setattr(builders, "build_trainer", tracked)
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
            "fused",
            "--reference",
            "--out",
            str(out),
        ]
    )
    gc.collect()
    assert len(models) == 2 and all(ref() is None for ref in models)
    raw = json.loads(out.read_text())
    assert raw["environment"]["torch"] == torch.__version__ and raw["world_size"] == 1
    results = raw["results"]
    assert [r["micro_batch"] for r in results] == [2, 4, 4, 8]
    assert all(r["tokens_per_s_per_gpu"] > 0 and not r.get("oom") for r in results)
    # MFU of both paths: the model's training FLOPs per token against the 989 TFLOP/s bf16 peak.
    config = LLaDAConfig(
        d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64, vocab_size=4096, mask_token_id=0
    )
    # By hand: per block 2*32 + 32^2 + 2*32*32 + 32^2 + 3*32*64 = 10304 parameters; 2 blocks + ln_f + the
    # output projection 4096*32 = 151,712; per token 3 * (2 * 151,712 + 4 * 2 * 32 * 32) = 934,848 FLOPs.
    per_token = config.training_flops(1, 32) / 32
    assert per_token == 934_848
    for r in results:
        assert r["mfu"] == pytest.approx(r["tokens_per_s_per_gpu"] * per_token / 989e12)
        assert r["step_s"] > 0
    for r in results[
        :2
    ]:  # the fused loss projects the masked rows only: 6 * 4096 * 32 FLOPs fewer per other row
        # 4 steps, 2 of warm-up: 2 timed steps; all tokens over all time lies between the fastest and slowest step
        steps = r["tokens_per_s_steps"]
        assert len(steps["repeats"]) == 2 and steps["min"] <= steps["median"] <= steps["max"]
        assert steps["min"] * (1 - 1e-9) <= r["tokens_per_s_per_gpu"] <= steps["max"] * (1 + 1e-9)
        assert 0.2 < r["masked_fraction"] < 0.8
        executed = per_token - 6 * 4096 * 32 * (1 - r["masked_fraction"])
        assert r["executed_utilisation"] == pytest.approx(r["tokens_per_s_per_gpu"] * executed / 989e12)
    for r in results[2:]:  # full logits: every row projected
        assert r["executed_utilisation"] == r["mfu"]
        # The reference keeps each timed step too: the run's figure lies within their range.
        steps = r["tokens_per_s_steps"]
        assert len(steps["repeats"]) == 2
        assert steps["min"] * (1 - 1e-9) <= r["tokens_per_s_per_gpu"] <= steps["max"] * (1 + 1e-9)
    assert results[0]["path"].startswith("ours") and results[2]["path"].startswith("reference")
    table = capsys.readouterr().out
    assert table.count("| ours") == 2 and table.count("| reference") == 2
