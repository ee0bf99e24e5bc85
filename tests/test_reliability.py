"""NaN guard, batch-geometry errors and a disk-full checkpoint save, on real tiny runs."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from composer.core import Callback
from test_train import ROOT, tiny_overrides

from composer_dlm import builders
from composer_dlm.callbacks.nan_guard import NonFiniteLossError
from composer_dlm.config import ConfigError, load_config


class PoisonLoss(Callback):
    """Makes the loss NaN at the given batches (1-based) and records whether each step changed the weights."""

    def __init__(self, batches: set[int]) -> None:
        self.batches = batches
        self.before: dict[str, torch.Tensor] = {}
        self.changed: dict[int, bool] = {}

    def batch_start(self, state, logger) -> None:
        self.before = {k: v.detach().clone() for k, v in state.model.state_dict().items()}

    def after_loss(self, state, logger) -> None:
        if int(state.timestamp.batch) + 1 in self.batches:
            state.loss = state.loss * float("nan")

    def batch_end(self, state, logger) -> None:
        after = state.model.state_dict()
        self.changed[int(state.timestamp.batch)] = any(
            not torch.equal(self.before[k], after[k]) for k in after
        )


def build(tmp_path, poison: PoisonLoss, **extra: str):
    over = {
        "callbacks.samples": "null",
        "callbacks.hf_export": "null",
        "eval_interval": "100ba",
        "checkpoint.save_interval": "2ba",
        "device_train_microbatch_size": "8",
        "scheduler.t_warmup": "0ba",
    } | extra
    cfg = load_config(ROOT / "yamls" / "quickstart.yaml", tiny_overrides(tmp_path, **over))
    return cfg, builders.build_trainer(cfg, extra_callbacks=[poison])


def test_nan_steps_are_skipped_and_training_continues(tmp_path):
    poison = PoisonLoss({3})
    _, trainer = build(tmp_path, poison)
    trainer.fit()
    assert poison.changed == {1: True, 2: True, 3: False, 4: True, 5: True, 6: True}
    assert all(torch.isfinite(p).all() for p in trainer.state.model.parameters())


def test_consecutive_nans_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    poison = PoisonLoss({3, 4, 5})
    cfg, trainer = build(tmp_path, poison, **{"callbacks.nan_guard.max_consecutive": "2"})
    with pytest.raises(
        NonFiniteLossError, match="2 consecutive non-finite losses/gradients, the last at batch 3"
    ):
        trainer.fit()
    folder = cfg.run_folder / "checkpoints"
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba2-rank0.pt"
    state = torch.load(folder / "latest-rank0.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["state"]["model"].values())


def test_global_batch_must_divide_by_world_size(tmp_path, monkeypatch):
    cfg = load_config(
        ROOT / "yamls" / "quickstart.yaml", tiny_overrides(tmp_path, global_train_batch_size="10")
    )
    monkeypatch.setattr(builders.dist, "get_world_size", lambda: 4)
    with pytest.raises(
        ConfigError, match=r"global_train_batch_size \(10\) is not divisible by the number of processes \(4\)"
    ):
        builders.device_batch_size(cfg)


def test_disk_full_during_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import composer.utils.checkpoint as ckpt

    original = ckpt._write_checkpoint_file
    calls = {"n": 0}

    def write(state_dict, filename):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save runs out of space halfway
            with open(filename, "wb") as f:
                f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(state_dict, filename)

    monkeypatch.setattr(ckpt, "_write_checkpoint_file", write)
    cfg, trainer = build(tmp_path, PoisonLoss(set()))
    with pytest.raises(OSError, match="No space left"):
        trainer.fit()
    trainer.close()
    monkeypatch.setattr(ckpt, "_write_checkpoint_file", original)
    # The next start repairs the folder and resumes from the complete checkpoint at batch 2.
    cfg, resumed = build(tmp_path, PoisonLoss(set()))
    assert int(resumed.state.timestamp.batch) == 2
    assert (cfg.run_folder / "checkpoints" / "ep0-ba4-rank0.pt.incomplete").exists()
    resumed.fit()
    assert int(resumed.state.timestamp.batch) == 6
