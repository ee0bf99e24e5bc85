"""Exports the model as a LLaDA Hugging Face folder (config.json + safetensors) during and after training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from composer_dlm.config import batch_interval
from composer_dlm.models.composer_llada import child_model, llada_weights
from composer_dlm.models.llada import write_pretrained

log = logging.getLogger(__name__)


def unwrap_llada(state: State):  # -> LLaDAModel, typed loosely to keep FSDP wrappers out of the signature
    """The LLaDAModel inside the trainer's ComposerModel (FSDP2 keeps the module class; FSDP1 wraps it)."""
    inner = child_model(state)
    return getattr(inner, "module", inner)


def full_llada_state_dict(state: State) -> dict[str, torch.Tensor]:
    """The full (unsharded) LLaDA state dict on CPU, under LLaDA's tensor names. Collective under FSDP."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # torch annotates the result with its generic state-dict ValueType; a model's state dict holds tensors.
    full = cast(dict[str, torch.Tensor], get_model_state_dict(state.model, options=options))
    return llada_weights(full)


class HuggingFaceExport(Callback):
    """Writes ``{folder}/ba{N}`` every ``interval`` and ``{folder}/final`` when training ends.

    Every rank takes part in gathering the weights; rank 0 writes. Each export is atomic (temporary folder, then
    rename), and is loadable with ``LLaDAModel.from_pretrained``.
    """

    def __init__(
        self, folder: str | Path, interval: str | None = None, dtype: torch.dtype = torch.bfloat16
    ) -> None:
        self.folder = Path(folder)
        self.interval = batch_interval(interval, "callbacks.hf_export.interval") if interval else None
        self.dtype = dtype

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.interval is not None and int(state.timestamp.batch) % self.interval == 0:
            self.export(state, self.folder / f"ba{int(state.timestamp.batch)}")

    def fit_end(self, state: State, logger: Logger) -> None:
        self.export(state, self.folder / "final")

    def export(self, state: State, target: Path) -> None:
        weights = full_llada_state_dict(state)
        if dist.get_global_rank() == 0:
            write_pretrained(unwrap_llada(state).config, weights, target, dtype=self.dtype)
            log.info("Exported Hugging Face folder %s", target)
        dist.barrier()
