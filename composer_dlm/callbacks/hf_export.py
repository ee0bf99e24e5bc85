"""Exports the model as a drop-in LLaDA Hugging Face folder (see models/hf_format.py) during and after training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import PreTrainedTokenizerBase

from composer_dlm.config import batch_interval
from composer_dlm.fsutil import remove_folder
from composer_dlm.models.composer_llada import llada_weights
from composer_dlm.models.lora import lora_settings, merge_adapters, wrapped_parameters, write_adapter
from composer_dlm.parallel import unwrap_llada

log = logging.getLogger(__name__)


def full_llada_state_dict(state: State) -> dict[str, torch.Tensor]:
    """The full (unsharded) LLaDA state dict on CPU, under LLaDA's tensor names. Collective under FSDP."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # torch annotates the result with its generic state-dict ValueType; a model's state dict holds tensors.
    full = cast(dict[str, torch.Tensor], get_model_state_dict(state.model, options=options))
    return llada_weights(full)


def reached_max_duration(state: State) -> bool:
    """Whether training has reached its ``max_duration`` (this batch is the last one)."""
    assert state.max_duration is not None, "build_trainer always sets max_duration"
    return state.timestamp.get(state.max_duration.unit) >= state.max_duration


def interval_exports(folder: Path) -> list[Path]:
    """The ``ba{N}`` exports in ``folder``, oldest (smallest N) first."""
    found = [p for p in folder.glob("ba*") if p.is_dir() and p.name[2:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[2:]))


def latest_export(folder: Path) -> Path | None:
    """A run's newest export in ``folder``: ``final``, else the ``ba{N}`` of the largest N, else None."""
    final = folder / "final"
    return final if final.is_dir() else next(reversed(interval_exports(folder)), None)


class HuggingFaceExport(Callback):
    """Writes ``{folder}/ba{N}`` every ``interval`` (keeping the newest ``keep``; None: all) and
    ``{folder}/final`` when training ends. The last batch gets ``final`` only.

    Every rank takes part in gathering the weights; rank 0 writes. Each export is atomic (temporary folder, then
    rename), loadable with ``LLaDAModel.from_pretrained``, and a drop-in LLaDA folder: every architecture key in
    config.json, ``tokenizer``'s files and generation_config.json beside the weights, and, when the run started
    from ``source`` (a folder with modeling files and an ``auto_map``), those files too.

    A LoRA run (models/lora.py) exports a peft adapter folder instead, or with ``merge`` the adapters merged into
    the weights as the same drop-in folder.
    """

    def __init__(
        self,
        folder: str | Path,
        interval: str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        source: str | Path | None = None,
        merge: bool = False,
        keep: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.interval = batch_interval(interval, "callbacks.hf_export.interval") if interval else None
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.source = source
        self.merge = merge
        self.keep = keep

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        if self.interval is None or batch % self.interval or reached_max_duration(state):
            return
        self.export(state, self.folder / f"ba{batch}")
        if dist.get_global_rank() == 0 and self.keep is not None:
            for old in interval_exports(self.folder)[: -self.keep]:
                remove_folder(old)

    def fit_end(self, state: State, logger: Logger) -> None:
        self.export(state, self.folder / "final")

    def export(self, state: State, target: Path) -> None:
        weights = full_llada_state_dict(state)
        model = unwrap_llada(state.model)
        lora = lora_settings(model)
        if dist.get_global_rank() == 0 and lora is not None and not self.merge:
            write_adapter(model, weights, target)
            log.info("Exported LoRA adapter folder %s", target)
        elif dist.get_global_rank() == 0:
            if lora is not None:
                weights = merge_adapters(weights, lora, wrapped_parameters(model))
            model.write_pretrained(
                weights, target, dtype=self.dtype, tokenizer=self.tokenizer, source=self.source
            )
            log.info("Exported Hugging Face folder %s", target)
        dist.barrier()
