"""Skips updates whose loss or gradients are not finite, and stops a run that keeps producing them."""

from __future__ import annotations

import logging

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite steps; the last good checkpoint is kept."""


class NaNGuard(Callback):
    """At ``AFTER_TRAIN_BATCH`` (after backward, before the optimizer step) checks loss and gradients.

    A non-finite value on any rank drops every gradient on every rank, so the optimizer skips the update (AdamW
    leaves parameters with no gradient untouched). After ``max_consecutive`` such steps in a row it raises
    :class:`NonFiniteLossError` naming the step. Costs one all-reduce of a flag and one host sync per step.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"callbacks.nan_guard.max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped_total = 0

    def after_train_batch(self, state: State, logger: Logger) -> None:
        losses = state.loss if isinstance(state.loss, (list, tuple)) else [state.loss]
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        flags = [~torch.isfinite(loss.detach()).all() for loss in losses if isinstance(loss, torch.Tensor)]
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
        for p in state.model.parameters():
            p.grad = None
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
