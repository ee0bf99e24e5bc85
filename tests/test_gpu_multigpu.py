"""Several GPUs through Composer's launcher: every parallel mode, sharded kill-and-resume, deterministic mode.

On the GPU machine (no ``composer`` on PATH there; the tests start ``python -m composer.cli.launcher``):

    python -m pytest tests/test_gpu_multigpu.py -q -rs      # world_size(2) tests are skipped on one GPU

Every FSDP mode needs CUDA (Composer 0.32.1 and torch refuse FSDP on CPU); DDP on CPU is in
tests/test_multiprocess.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from faults import (
    ROOT,
    kill_after_batches,
    kill_group,
    launch_ranks,
    rank0_metrics,
    rank0_metrics_by_attempt,
    run_ranks,
)

from composer_dlm.models import LLaDAModel

pytestmark = pytest.mark.gpu

QUICKSTART = str(ROOT / "yamls" / "quickstart.yaml")
TRAIN = str(ROOT / "composer_dlm" / "train.py")
FAULTS = str(ROOT / "tests" / "faults.py")
ENV = {"TRITON_INTERPRET": "0"}
LOSS = "loss/train/total"


def overrides(base: Path, run: str, fsdp: dict[str, str] | None, **extra: str) -> list[str]:
    """The quickstart model (fused Triton loss, bf16 autocast) on 2 x 4 rows of 128 tokens."""
    over = {
        "base_path": str(base),
        "run_name": run,
        "precision": "amp_bf16",
        "global_train_batch_size": "8",
        "device_train_microbatch_size": "2",
        "scheduler.t_warmup": "0ba",
        "train_loader.num_workers": "0",
        "logging.console_interval": "1ba",
        "diffusion.random_length_prob": "0.3",
        "callbacks.samples": "null",
        "callbacks.hf_export": "null",
        "eval_interval": "1000ba",
    }
    if fsdp is not None:
        over |= {f"fsdp.{k}": v for k, v in fsdp.items()}
    return [f"{k}={v}" for k, v in (over | extra).items()]


MODES = {
    "ddp": None,
    "full_shard-full": {"sharding_strategy": "FULL_SHARD", "state_dict_type": "full"},
    "full_shard-sharded": {"sharding_strategy": "FULL_SHARD", "state_dict_type": "sharded"},
    "shard_grad_op-sharded": {"sharding_strategy": "SHARD_GRAD_OP", "state_dict_type": "sharded"},
    "hybrid_shard-sharded": {
        "sharding_strategy": "HYBRID_SHARD",
        "data_parallel_replicate_degree": "2",
        "data_parallel_shard_degree": "1",
        "state_dict_type": "sharded",
    },
    "no_shard-full": {"sharding_strategy": "NO_SHARD", "state_dict_type": "full"},
    "full_shard-checkpointing": {"sharding_strategy": "FULL_SHARD", "activation_checkpointing": "true"},
}


@pytest.mark.world_size(2)
@pytest.mark.parametrize("mode", list(MODES))
def test_every_parallel_mode_trains_samples_exports_and_resumes(tmp_path, mode):
    """Two GPUs: 4 batches with samples, eval, likelihood eval and HF export in each parallel mode, saving
    checkpoints in its state-dict type; then the same run resumed from them to 6 batches."""
    _modes_run(tmp_path, mode, 2)


@pytest.mark.parametrize("mode", ["full_shard-sharded", "full_shard-checkpointing"])
def test_fsdp_wrapped_model_on_one_gpu_trains_samples_exports_and_resumes(tmp_path, mode):
    """One GPU (torch runs every sharding strategy as NO_SHARD there): the callbacks reach the model through the
    FSDP wrapper (and activation-checkpoint wrappers), sharded checkpoints save and resume."""
    _modes_run(tmp_path, mode, 1)


def _modes_run(tmp_path: Path, mode: str, nproc: int) -> None:
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"prompt": "import", "choices": [" os", " sys"], "answer": 0}) + "\n")
    callbacks = {
        "eval_interval": "2ba",
        "eval_subset_num_batches": "2",
        "checkpoint.save_interval": "2ba",
        "callbacks.samples": "{interval: 2ba, prompts: [The], gen_length: 8, steps: 4}",
        "callbacks.hf_export": "{interval: 2ba}",
        "callbacks.likelihood_eval.data": str(mc),
        "callbacks.likelihood_eval.interval": "2ba",
        "callbacks.likelihood_eval.num_samples": "4",
    }
    args = overrides(tmp_path, "modes", MODES[mode], **callbacks)
    run_ranks(nproc, [TRAIN, QUICKSTART, *args, "max_duration=4ba"], ENV)
    folder = tmp_path / "modes"
    samples = (folder / "samples.txt").read_text().splitlines()
    assert [line.split("]")[0] for line in samples] == ["[sample @ batch 2", "[sample @ batch 4"]
    exported = LLaDAModel.from_pretrained(folder / "hf" / "final")
    ids = torch.randint(0, 4000, (1, 16))
    assert torch.isfinite(exported(ids)).all()
    run_ranks(nproc, [TRAIN, QUICKSTART, *args, "max_duration=6ba"], ENV)
    first, resumed = rank0_metrics_by_attempt(folder, LOSS)
    # batch k logged under step k - 1: the first launch logs 0..3, the second resumes from ba4 (not from scratch)
    assert sorted(first) == [0, 1, 2, 3] and sorted(resumed) == [4, 5]
    curve = first | resumed
    assert curve[5] < curve[0]


def _final_model_weights(run_folder: Path, steps: int, tmp: Path) -> dict[str, torch.Tensor]:
    """The model tensors of the sharded checkpoint at ``steps``, gathered into one file by torch's converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    (shards,) = [
        d for d in (run_folder / "checkpoints").glob(f"ep*-ba{steps}") if (d / ".metadata").is_file()
    ]
    out = tmp / f"{run_folder.parent.name}.pt"
    dcp_to_torch_save(shards, out)
    return torch.load(out, map_location="cpu", weights_only=False)["state"]["model"]


STEPS = 8


def _kill_and_resume(tmp_path: Path, nproc: int, deterministic: bool, **model: str) -> None:
    """A FULL_SHARD run with sharded checkpoints, killed while every rank writes its 2nd checkpoint (ba4) and
    again mid-run, restarted each time, against an uninterrupted run: bit-identical weights under
    ``deterministic: true``, otherwise the same losses within run-to-run noise. ``model`` adds overrides."""
    fsdp = {"sharding_strategy": "FULL_SHARD", "state_dict_type": "sharded"}
    extra = model | {
        "checkpoint.save_interval": "2ba",
        "max_duration": f"{STEPS}ba",
        "deterministic": str(deterministic),
    }
    run_ranks(nproc, [TRAIN, QUICKSTART, *overrides(tmp_path / "ref", "kr", fsdp, **extra)], ENV)
    args = overrides(tmp_path / "faulty", "kr", fsdp, **extra)
    p = launch_ranks(nproc, [FAULTS, "dcp", "2", QUICKSTART, *args], ENV)
    out, _ = p.communicate(timeout=600)
    kill_group(p)
    assert p.returncode != 0, out
    p = launch_ranks(nproc, [TRAIN, QUICKSTART, *args], ENV)
    kill_after_batches(p, 3, group=True)  # resumed from ba2: killed at batch 5, after saving ba4
    run_ranks(nproc, [TRAIN, QUICKSTART, *args], ENV)
    assert min(rank0_metrics_by_attempt(tmp_path / "faulty" / "kr", LOSS)[-1]) == 4  # resumed from ba4

    ref, got = rank0_metrics(tmp_path / "ref" / "kr", LOSS), rank0_metrics(tmp_path / "faulty" / "kr", LOSS)
    assert sorted(ref) == sorted(got) == list(range(STEPS))
    ref_w = _final_model_weights(tmp_path / "ref" / "kr", STEPS, tmp_path)
    got_w = _final_model_weights(tmp_path / "faulty" / "kr", STEPS, tmp_path)
    assert ref_w.keys() == got_w.keys()
    if deterministic:
        assert got == ref
        for name in ref_w:
            assert torch.equal(ref_w[name], got_w[name]), name
    else:  # bf16 GPU runs differ from each other in the last bits; a resume error would be far larger
        for batch in ref:
            assert got[batch] == pytest.approx(ref[batch], rel=2e-2, abs=1e-2), batch


@pytest.mark.world_size(2)
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "default"])
def test_two_gpu_fsdp_sharded_kill_and_resume(tmp_path, deterministic):
    _kill_and_resume(tmp_path, 2, deterministic)


def test_one_gpu_deterministic_sharded_kill_and_resume(tmp_path):
    _kill_and_resume(tmp_path, 1, True)


@pytest.mark.parametrize("precision", ["amp_bf16", "amp_fp16"])
def test_nan_guard_under_fsdp(tmp_path, precision):
    """One GPU, FSDP FULL_SHARD (gradients are views into the flat parameters): a NaN loss at batch 3 leaves the
    weights untouched and training goes on. Under amp_fp16 only that step counts as non-finite, whatever
    overflow skips the GradScaler makes on its own."""
    from test_reliability import PoisonLoss, build

    from composer_dlm.callbacks.nan_guard import NaNGuard

    poison = PoisonLoss({3})
    _, trainer = build(tmp_path, poison, precision=precision, **{"fsdp.sharding_strategy": "FULL_SHARD"})
    trainer.fit()
    (guard,) = [c for c in trainer.state.callbacks if isinstance(c, NaNGuard)]
    assert guard.skipped_total == 1
    assert poison.changed[3] is False and any(poison.changed[b] for b in (4, 5, 6))
    assert all(torch.isfinite(p).all() for p in trainer.state.model.parameters())
    trainer.close()
