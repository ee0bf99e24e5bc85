"""LoRA adapters on LLaDA's linear layers, through peft: the ``model.lora`` section, injection, and the two exports.

A LoRA layer computes ``base(x) + scaling * B(A(dropout(x)))`` with ``A`` (r x in), ``B`` (out x r), ``B``
initialised to zero and ``scaling = alpha / r``; only ``A`` and ``B`` train. The frozen base keeps the dtype
the run computes in (bf16 under ``amp_bf16``: no fp32 copy and no optimizer state for it); adapters are fp32.

Targets are the block projections by the architecture's names. LLaDA: ``ff_out`` means the blocks' MLP output
projection only: the output head (``model.transformer.ff_out``) is never adapted, because the fused loss reads its
weight directly. LLaDA-MoE: ``q_proj`` ... ``o_proj`` are the attention projections; ``gate_proj``, ``up_proj``,
``down_proj`` adapt the shared expert's and dense layers' linear layers and the routed experts' stacked parameters
(peft's ``target_parameters``: one adapter per stacked parameter, with a rank-``r`` pair per expert,
``W_e + scaling * B_e @ A_e``); the router is never adapted.

Exports (see :func:`write_adapter` and :func:`merge_adapters`): a peft adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, loadable with ``peft.PeftModel.from_pretrained`` on the base model), or a merged
LLaDA folder with ``W + scaling * B @ A`` in place of each adapted weight.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from composer_dlm.fsutil import staged_folder
from composer_dlm.models.architectures import AnyConfig, AnyModel, from_pretrained
from composer_dlm.models.hf_format import CheckpointError
from composer_dlm.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModel

TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")  # LLaDA's
MOE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # LLaDA-MoE's
EXPERT_PROJECTIONS = (
    "gate_proj",
    "up_proj",
    "down_proj",
)  # LLaDA-MoE names that also adapt the routed experts
ADAPTER_NAME = "default"  # peft's adapter name; peft drops it from the names in an adapter folder
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what peft.PeftModel puts before the base model's own parameter names


@dataclasses.dataclass
class LoRAConfig:
    """``model.lora``: rank ``r``, ``alpha`` (scaling = alpha / r), dropout on the adapter input, and which of the
    block projections get an adapter (LLaDA's ``TARGETS`` or LLaDA-MoE's ``MOE_TARGETS``; None: all of them)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        names = self.target_modules
        bad = [t for t in names or () if t not in TARGETS + MOE_TARGETS]
        if bad or names == []:
            what = f"{', '.join(map(repr, bad))} not a layer name" if bad else "empty"
            raise ValueError(
                f"target_modules: {what}; choose from LLaDA's {', '.join(TARGETS)} (ff_out is the blocks' MLP output "
                f"projection; the output head is never adapted) or LLaDA-MoE's {', '.join(MOE_TARGETS)}, or leave "
                "it unset for all of them"
            )
        if importlib.util.find_spec("peft") is None:
            raise ValueError("LoRA needs peft: pip install 'composer-dlm[lora]'")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def targets(self, model: nn.Module) -> list[str]:
        """The projection names adapted on ``model``: ``target_modules``, or all of its architecture's; a name
        of the other architecture is a ValueError."""
        valid = MOE_TARGETS if isinstance(model, LLaDAMoEModel) else TARGETS
        names = valid if self.target_modules is None else self.target_modules
        bad = [t for t in names if t not in valid]
        if bad:
            arch = type(model).__name__.removesuffix("Model")
            raise ValueError(
                f"target_modules: {', '.join(map(repr, bad))} not {arch} layer name(s); choose from {', '.join(valid)}"
            )
        return sorted(set(names))

    def adapts_stacked_experts(self, config: AnyConfig) -> bool:
        """Whether peft adapts the routed experts' stacked parameters of a model of ``config`` (LLaDA-MoE with
        ``gate_proj``, ``up_proj`` or ``down_proj`` among the targets): FSDP then leaves those experts out
        (:func:`fsdp_units`)."""
        names = MOE_TARGETS if self.target_modules is None else self.target_modules
        return isinstance(config, LLaDAMoEConfig) and any(n in EXPERT_PROJECTIONS for n in names)

    def peft_config(self, model: nn.Module, base_model: str | None = None) -> Any:  # -> peft.LoraConfig
        """peft's LoraConfig for ``model``: a regex on full module names (so LLaDA's ``ff_out`` matches the blocks
        and not the head, LLaDA-MoE's ``gate_proj`` not the router ``gate``), and for LLaDA-MoE's routed experts
        their stacked parameters (``target_parameters``; peft allows no dropout there)."""
        from peft import LoraConfig

        names = self.targets(model)
        group = "|".join(names)
        parameters = None
        if isinstance(model, LLaDAMoEModel):
            attention = "|".join(n for n in names if n not in EXPERT_PROJECTIONS) or "(?!)"
            mlp = "|".join(n for n in names if n in EXPERT_PROJECTIONS) or "(?!)"
            modules = rf"model\.layers\.\d+\.(self_attn\.({attention})|(shared_expert|mlp)\.({mlp}))"
            parameters = [f"experts.{n}" for n in names if n in EXPERT_PROJECTIONS] or None
            if parameters and self.dropout:
                raise ValueError(
                    "dropout must be 0 when LLaDA-MoE's routed experts are adapted (peft's LoRA on their stacked "
                    "parameters cannot drop the input); set model.lora.dropout: 0 or leave gate_proj, up_proj and "
                    "down_proj out of target_modules"
                )
        else:
            modules = rf"model\.transformer\.blocks\.\d+\.({group})"
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=modules,
            target_parameters=parameters,
            base_model_name_or_path=base_model,
            bias="none",
        )


def apply_lora(
    model: AnyModel,
    cfg: LoRAConfig,
    *,
    base_dtype: torch.dtype,
    seed: int = 0,
    base_model: str | None = None,
) -> AnyModel:
    """Freezes ``model`` in ``base_dtype`` and injects fp32 adapters in place (peft), returning the same object.

    ``A`` is drawn from torch's generator seeded with ``seed`` (peft's Kaiming-uniform init), so a run starts from
    the same adapters every time; ``B`` is zero, so the adapted model starts equal to the base.
    ``base_model`` (the pretrained folder) is recorded in the adapter folder's config.
    """
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    model.requires_grad_(False)
    model.to(base_dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(cfg.peft_config(model, base_model), model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        adapter = is_adapter_weight(name)
        param.requires_grad_(adapter)
        if adapter:
            param.data = param.data.float()
    if base_dtype != torch.float32:
        # A half-precision base runs under autocast, which casts the adapters' inputs itself. peft's own cast of
        # them to the adapters' fp32 makes autograd keep extra copies for the backward, for the same result
        # (tests/test_lora.py: 31.0 -> 26.8 MB saved for a 2-block d_model 256 model on 2 x 512 tokens).
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.cast_input_dtype_enabled = False
    return model


def is_adapter_weight(name: str) -> bool:
    """Whether a parameter (or state-dict key) is a LoRA adapter matrix."""
    return ".lora_A." in name or ".lora_B." in name


def fsdp_units(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """How torch's FSDP1 must hold a LoRA model's adapters: (modules to make units of their own, modules to leave
    out of FSDP). FSDP1 flattens each unit into one tensor of one dtype, so the fp32 adapters cannot share the units
    of the bf16 blocks, and it gathers a unit's weights only when that unit's ``forward`` runs.

    - peft's LoRA on a linear layer calls its ``lora_A`` / ``lora_B`` modules: each is a unit.
    - peft's ``ParamWrapper`` (LLaDA-MoE's stacked experts) reads its ``lora_A`` / ``lora_B`` weights without calling
      them (as units of their own they would be read as shards), and adds ``B @ A`` to the stacked parameter through
      torch's parametrize, which fails on FSDP's views into a flat parameter (even unsharded). So each wrapper is
      the unit (its forward gathers its own adapters; a nested wrapper is a unit of its own), and the module whose
      parameters it adapts (the frozen routed experts) is left out of FSDP: whole on every rank, never gathered,
      with no gradient to reduce. tests/test_llada_moe_lora.py runs both with torch's FSDP1.

    ([], []) for a model without adapters."""
    if lora_settings(model) is None:
        return [], []
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    units: list[nn.Module] = []
    left_out: dict[int, nn.Module] = {}  # by identity: nested wrappers share one base
    for module in model.modules():
        if isinstance(module, ParamWrapper):
            units.append(module)
            base = module.get_base_layer()
            left_out.setdefault(id(base), base)
        elif isinstance(module, LoraLayer):
            units += [*module.lora_A.values(), *module.lora_B.values()]
    return units, list(left_out.values())


def lora_settings(model: nn.Module) -> LoRAConfig | None:
    """The LoRA settings of a model :func:`apply_lora` adapted (peft records them on it); None for a plain model."""
    peft_configs = getattr(model, "peft_config", None)
    if not peft_configs:
        return None
    c = peft_configs[ADAPTER_NAME]
    targets = c.target_modules
    names = re.findall(r"[a-z]+_[a-z]+", targets) if isinstance(targets, str) else list(targets)
    names = [n for n in dict.fromkeys(names) if n in TARGETS + MOE_TARGETS]
    return LoRAConfig(r=c.r, alpha=c.lora_alpha, dropout=c.lora_dropout, target_modules=names)


def wrapped_parameters(model: nn.Module) -> dict[str, str]:
    """For each adapter peft put on a parameter (LLaDA-MoE's stacked experts): the name its ``lora_A`` /
    ``lora_B`` keys start with (``model.layers.1.mlp.experts.base_layer``: peft nests one wrapper per parameter)
    -> the adapted parameter's plain name (``model.layers.1.mlp.experts.up_proj``). Wrapper segments (FSDP,
    activation checkpointing, compile) are dropped, as in the state dicts the exports read."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            clean = plain_name(name)
            out[clean] = f"{clean.replace('.base_layer', '')}.{module.parameter_name}"
    return out


def plain_name(name: str) -> str:
    for segment in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(segment, "")
    return name


def drop_frozen_weights(checkpoint: dict[str, Any]) -> None:
    """Composer ``save_ignore_keys`` hook: a LoRA run's checkpoint keeps the adapters and drops the frozen base,
    which every start (and so every resume) loads again from ``model.pretrained``."""
    model_state = checkpoint.get("state", {}).get("model")
    if isinstance(model_state, dict):
        for key in [k for k in model_state if not is_adapter_weight(k)]:
            del model_state[key]


# --- exports (LLaDA-named state dicts, as hf_export gathers them) ------------------------------------------


def _adapted_layers(weights: Mapping[str, torch.Tensor]) -> list[str]:
    """Module names (``model.transformer.blocks.0.q_proj``) that carry an adapter."""
    suffix = f".lora_A.{ADAPTER_NAME}.weight"
    return [k.removesuffix(suffix) for k in weights if k.endswith(suffix)]


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """What an adapter adds to its layer's weight: ``scaling * B @ A``, in fp32."""
    return scaling * (b.float() @ a.float())


def stacked_lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, num_experts: int) -> torch.Tensor:
    """What an adapter adds to a stacked (E, out, in) expert parameter, in fp32: ``scaling * B_e @ A_e`` for each
    expert e, in peft's layout: ``A`` (E * r, in) holds expert e's rows e*r ... e*r + r-1, ``B`` (out, r * E) its
    columns e, e + E, e + 2E ... (``lora.ParamWrapper``)."""
    a_ERI = a.float().reshape(num_experts, -1, a.shape[-1])
    b_EOR = b.float().reshape(b.shape[0], -1, num_experts).permute(2, 0, 1)
    return scaling * torch.bmm(b_EOR, a_ERI)


def merge_adapters(
    weights: Mapping[str, torch.Tensor], cfg: LoRAConfig, wrapped: Mapping[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Plain weights from adapted ones: ``W + scaling * B @ A`` (in fp32) for every adapted layer, and for every
    adapted stacked parameter (``wrapped``: :func:`wrapped_parameters` of the model) each expert's
    (:func:`stacked_lora_delta`)."""
    wrapped = wrapped or {}
    merged = {k.replace(".base_layer", ""): v for k, v in weights.items() if not is_adapter_weight(k)}
    for layer in _adapted_layers(weights):
        a = weights[f"{layer}.lora_A.{ADAPTER_NAME}.weight"]
        b = weights[f"{layer}.lora_B.{ADAPTER_NAME}.weight"]
        if layer in wrapped:
            base = merged[wrapped[layer]]
            merged[wrapped[layer]] = base.float() + stacked_lora_delta(a, b, cfg.scaling, base.shape[0])
        else:
            merged[f"{layer}.weight"] = weights[f"{layer}.base_layer.weight"].float() + lora_delta(
                a, b, cfg.scaling
            )
    return merged


def write_adapter(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    folder: str | os.PathLike[str],
) -> None:
    """Writes a peft adapter folder (atomically): adapter_config.json (the settings :func:`apply_lora` gave
    ``model``) and the fp32 adapters in safetensors, named as ``peft.PeftModel`` names them
    (``base_model.model.<layer>.lora_A.weight``)."""
    tensors = {
        PEFT_PREFIX + k.replace(f".{ADAPTER_NAME}.", "."): v.detach().to("cpu", torch.float32).contiguous()
        for k, v in weights.items()
        if is_adapter_weight(k)
    }
    with staged_folder(Path(folder)) as tmp:
        tmp.mkdir()
        cast(Any, model).peft_config[ADAPTER_NAME].save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def is_adapter_folder(folder: str | os.PathLike[str]) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def load_merged(
    adapter_folder: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> AnyModel:
    """A plain model: the base folder (``base``, else the one adapter_config.json names; either architecture) with
    the adapter folder merged into its weights in fp32, then cast to ``dtype``. For sampling from a LoRA run's
    export. Adapters on stacked expert parameters (LLaDA-MoE) are merged by peft itself."""
    folder = Path(adapter_folder)
    settings = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = base if base is not None else settings.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise CheckpointError(
            f"{folder}: the base model folder {base!r} named in {ADAPTER_CONFIG} (base_model_name_or_path) is "
            "not there; set it to the base LLaDA folder the adapter was trained on"
        )
    model = from_pretrained(base, dtype=torch.float32, device=device)
    if settings.get("target_parameters"):
        from peft import PeftModel

        merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        assert merged is model
        return model.to(dtype) if dtype is not None else model
    scaling = settings["lora_alpha"] / settings["r"]
    adapters = load_file(str(folder / ADAPTER_WEIGHTS), device=str(device or "cpu"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in adapters.items():
            if ".lora_A." not in key:
                continue
            layer = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            b = adapters[f"{PEFT_PREFIX}{layer}.lora_B.weight"]
            params[f"{layer}.weight"].add_(lora_delta(a, b, scaling))
    return model.to(dtype) if dtype is not None else model
