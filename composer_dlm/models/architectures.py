"""The architectures a run can train, picked from a config.json mapping or ``model.architecture``.

``llada``: :class:`.llada.LLaDAModel` (LLaDA's release and any LLaDA-format dense variant); ``llada_moe``:
:class:`.llada_moe.LLaDAMoEModel` (config.json with model_type "lladamoe", or LLaDA-MoE's keys, see
:func:`.hf_format.is_moe_config`). Both take the same calls (forward with ``head``, ``from_pretrained``,
``save_pretrained``, ``write_pretrained``), so the trainer, sampler and evaluators do not ask which one they have.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from composer_dlm.models import hf_format
from composer_dlm.models.llada import LLaDAConfig, LLaDAModel
from composer_dlm.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModel

Architecture = Literal["llada", "llada_moe"]
AnyConfig = LLaDAConfig | LLaDAMoEConfig
AnyModel = LLaDAModel | LLaDAMoEModel


def architecture_of(data: Mapping[str, Any]) -> Architecture:
    return "llada_moe" if hf_format.is_moe_config(data) else "llada"


def config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> AnyConfig:
    """The config of the architecture ``data`` (a config.json mapping) describes."""
    if architecture_of(data) == "llada_moe":
        return LLaDAMoEConfig.from_dict(data, source=source)
    return LLaDAConfig.from_dict(data, source=source)


def config_from_json(path: str | os.PathLike[str]) -> AnyConfig:
    return config_from_dict(hf_format.read_config(path), source=str(path))


def module_for(config: AnyConfig) -> AnyModel:
    """The model of ``config``'s architecture, built with torch's defaults (no initialisation of ours): for
    callers that construct on the meta device and fill the weights themselves."""
    return LLaDAMoEModel(config) if isinstance(config, LLaDAMoEConfig) else LLaDAModel(config)


def from_config(
    config: AnyConfig, *, seed: int | None = None, device: str | torch.device | None = None
) -> AnyModel:
    """A freshly initialised model of ``config``'s architecture."""
    if isinstance(config, LLaDAMoEConfig):
        return LLaDAMoEModel.from_config(config, seed=seed, device=device)
    return LLaDAModel.from_config(config, seed=seed, device=device)


def from_pretrained(
    folder: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> AnyModel:
    """A Hugging Face folder of either architecture, picked from its config.json."""
    path = hf_format.check_folder(folder)
    data = hf_format.read_config(Path(path) / hf_format.CONFIG_NAME)
    if architecture_of(data) == "llada_moe":
        return LLaDAMoEModel.from_pretrained(path, dtype=dtype, device=device)
    return LLaDAModel.from_pretrained(path, dtype=dtype, device=device)
