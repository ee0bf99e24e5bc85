"""A tiny training run through the real builders, recording the batches it reads (shared by the data-source tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from composer.core import Callback

from composer_dlm import builders
from composer_dlm.config import TrainConfig, load_config

QUICKSTART = Path(__file__).resolve().parents[1] / "yamls" / "quickstart.yaml"


class Batches(Callback):
    """Every batch's input ids, as the loader handed them to the trainer."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def after_dataloader(self, state, logger) -> None:
        self.seen.append(state.batch["input_ids"].clone())


def tiny_run_overrides(base: Path, run: str, tokenizer: str, duration: str, seq_len: int) -> list[str]:
    """A one-layer model on ``tokenizer``, 4 sequences a batch, checkpoints every 2 batches, no eval/samples/export."""
    return [
        f"base_path={base}",
        f"run_name={run}",
        f"tokenizer.name={tokenizer}",
        "model.config.d_model=32",
        "model.config.n_layers=1",
        "model.config.n_heads=2",
        "model.config.mlp_hidden_size=64",
        "model.config.vocab_size=320",
        "model.loss_impl=plain",
        f"max_seq_len={seq_len}",
        "global_train_batch_size=4",
        "device_train_microbatch_size=4",
        f"max_duration={duration}",
        "checkpoint.save_interval=2ba",
        "eval_loader=null",
        "callbacks.samples=null",
        "callbacks.hf_export=null",
        "train_loader.num_workers=0",
    ]


def embedded_run_overrides(base: Path, run: str, duration: str, seq_len: int = 32) -> list[str]:
    """:func:`tiny_run_overrides` on the embedded corpus and tokenizer, with an eval of one batch and an HF export
    every 2 batches (the quickstart's outputs, in seconds)."""
    kept = [
        o
        for o in tiny_run_overrides(base, run, "embedded", duration, seq_len)
        if not o.startswith(("eval_loader=", "callbacks.hf_export=", "model.config.vocab_size="))
    ]
    return kept + [
        "model.config.vocab_size=4096",
        "eval_interval=2ba",
        "eval_subset_num_batches=1",
        "device_eval_batch_size=4",
        "eval_loader.num_workers=0",
        "callbacks.hf_export.interval=2ba",
    ]


def fit(overrides: list[str], extra_callbacks: list[Callback] | None = None) -> TrainConfig:
    """The quickstart YAML with ``overrides``, built by the real builders and trained to its max_duration."""
    cfg = load_config(QUICKSTART, overrides)
    trainer = builders.build_trainer(cfg, extra_callbacks=extra_callbacks)
    trainer.fit()
    trainer.close()
    return cfg


def fit_recording_batches(overrides: list[str]) -> tuple[list[torch.Tensor], TrainConfig]:
    """The quickstart YAML with ``overrides``, trained to its max_duration; returns the batches read and the config."""
    batches = Batches()
    cfg = fit(overrides, [batches])
    return batches.seen, cfg
