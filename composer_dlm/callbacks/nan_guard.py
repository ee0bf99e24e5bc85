"""Skips updates whose loss or gradients are not finite, and stops a run that keeps producing them."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from composer.core import Callback, Precision, State
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger(__name__)


def _optimized_params(state: State) -> Iterator[torch.Tensor]:
    for optimizer in state.optimizers:
        for group in optimizer.param_groups:
            yield from group["params"]


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite steps; the last good checkpoint is kept."""


class NaNGuard(Callback):
    """At ``AFTER_TRAIN_BATCH`` (after backward, before the optimizer step) checks loss and gradients.

    A non-finite value on any rank drops every gradient on every rank, so the optimizer skips the update (AdamW
    leaves parameters with no gradient untouched). After ``max_consecutive`` such steps in a row it raises
    :class:`NonFiniteLossError` naming the step. Costs one all-reduce of a flag and one host sync per step.

    The gradients checked and dropped are those of the parameters the optimizer steps: under FSDP with
    ``use_orig_params`` these are views into the flat parameters' local shards (FSDP writes a dropped one back
    as zeros before the next forward), without it the flat parameters themselves. Under ``amp_fp16`` Composer's
    GradScaler skips steps whose (unscaled) gradients overflow and lowers its scale; such a step is the
    scaler's to handle, not a non-finite step, so there only the loss is checked.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"callbacks.nan_guard.max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped_total = 0

    def after_train_batch(self, state: State, logger: Logger) -> None:
        losses = state.loss if isinstance(state.loss, (list, tuple)) else [state.loss]
        flags = [~torch.isfinite(loss.detach()).all() for loss in losses if isinstance(loss, torch.Tensor)]
        if state.precision != Precision.AMP_FP16:
            grads = [p.grad for p in _optimized_params(state) if p.grad is not None]
            if grads:
                local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
                norms = torch._foreach_norm(local)
                flags.append(~torch.isfinite(torch.stack(norms)).all())
        bad = torch.stack(flags).any().float().reshape(1) if flags else torch.zeros(1)
        dist.all_reduce(bad, reduce_operation="MAX")
        if bad.item() == 0:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped_total += 1
        step = int(state.timestamp.batch)
        for optimizer in state.optimizers:
            optimizer.zero_grad(set_to_none=True)
        logger.log_metrics({"nan_guard/skipped_steps": self.skipped_total})
        log.warning(
            "Non-finite loss or gradient at batch %d: update skipped (%d in a row)", step, self.consecutive
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive non-finite losses/gradients, the last at batch {step}. Training "
                "stopped; the last good checkpoint is kept. Lower optimizer.lr, check the data, or raise "
                "callbacks.nan_guard.max_consecutive."
            )

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = state.get("consecutive", 0)
        self.skipped_total = state.get("skipped_total", 0)
