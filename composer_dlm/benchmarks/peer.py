"""LLaDA's own sampler and modeling code, loaded from a folder outside the repository, on our weights.

The peers' code is never part of this project. Benchmarks and fixture scripts take a folder holding it (for
LLaDA: ``generate.py`` from ML-GSAI/LLaDA beside ``modeling_llada.py`` and ``configuration_llada.py`` from a
LLaDA modeling folder) and import it as a package, so the modeling file's relative import of its configuration
works. :func:`peer_model` builds that modeling class from one of our models' configuration and loads our
weights into it under LLaDA's tensor names (the names are the same, see :mod:`composer_dlm.models.hf_format`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
from torch import nn

from composer_dlm.models import LLaDAModel
from composer_dlm.models.hf_format import export_config


def load_package(name: str, folder: str | Path) -> types.ModuleType:
    """Imports ``folder`` as the package ``name`` (no ``__init__.py`` needed); its modules are then
    ``importlib.import_module(f"{name}.generate")`` and so on.

    LLaDA's modeling file imports ``einops`` for an attention path it does not use by default; where einops is not
    installed, a stand-in module that raises on use is registered so that the import succeeds.
    """
    folder = Path(folder)
    if not (folder / "generate.py").is_file():
        raise FileNotFoundError(f"{folder} has no generate.py: pass the folder holding the peer's sampler")
    if "einops" not in sys.modules and importlib.util.find_spec("einops") is None:
        stand_in = types.ModuleType("einops")

        def rearrange(*args: object, **kwargs: object) -> None:
            raise RuntimeError(
                "einops is not installed (stand-in registered by composer_dlm.benchmarks.peer)"
            )

        stand_in.rearrange = rearrange  # type: ignore[attr-defined]
        sys.modules["einops"] = stand_in
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    sys.modules[name] = package
    return package


def peer_model(modeling: types.ModuleType, configuration: types.ModuleType, ours: LLaDAModel) -> nn.Module:
    """LLaDA's ``LLaDAModelLM`` with the configuration and weights of ``ours`` (same dtype and device), in eval mode."""
    fields = export_config(ours.config.to_dict(), auto_map={})
    config = configuration.LLaDAConfig(**fields)
    with torch.device("meta"):
        model = modeling.LLaDAModelLM(config, init_params=False)
    param = next(ours.parameters())
    # assign: the peer's parameters are our tensors (no second copy of an 8B model).
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"the peer model's tensors differ from ours: missing {missing}, unexpected {unexpected}"
        )
    return model.to(param.dtype).eval()
