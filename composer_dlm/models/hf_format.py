"""LLaDA's Hugging Face folders: config.json keys, safetensors shards, and what ships beside the weights.

A release folder (``GSAI-ML/LLaDA-8B-Base``) holds ``config.json``, safetensors shards (with
``model.safetensors.index.json`` when sharded), the tokenizer files, ``generation_config.json`` and LLaDA's own
modeling files, which ``config.json``'s ``auto_map`` points at for ``AutoModel.from_pretrained(...,
trust_remote_code=True)``; an export of a network trained here ships composer-dlm's own modeling files instead
(:mod:`composer_dlm.models.hf_remote`). Tensor names equal our parameter names
(``model.transformer.blocks.0.q_proj.weight``), so no renaming map is needed.

LLaDA's configuration class fills every key missing from ``config.json`` with a default that describes another
network (fused "sequential" blocks, layer norm, no RoPE, tied weights, dropout 0.1). An export therefore states
every architecture key with the value of LLaDA's release (:data:`RELEASE_ARCHITECTURE`). This module knows the
format only; it deals in plain mappings and tensors and does not import the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from composer_dlm.fsutil import staged_folder
from composer_dlm.models.hf_remote.configuration_llada import unsupported_settings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"

# composer-dlm's own remote code, written into every export whose source folder has none, and its auto_map.
REMOTE_CODE = Path(__file__).resolve().parent / "hf_remote"
REMOTE_CODE_FILES = ("configuration_llada.py", "modeling_llada.py", "llada_layers.py")
REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModel": "modeling_llada.LLaDAModelLM",
    "AutoModelForMaskedLM": "modeling_llada.LLaDAModelLM",
}

# Modes of exported files and folders: readable by everyone (the safetensors writer alone would leave 0600).
C = TypeVar("C")

FILE_MODE = 0o644
FOLDER_MODE = 0o755


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used as it is; the message says what to change."""


# The keys of LLaDA's release config.json that are the same for every network this implementation builds: a
# Llama-style block (separate q/k/v/up/gate projections), SiLU-gated MLP, RMSNorm with a weight and no bias,
# RoPE in fp32, no ALiBi, no biases anywhere, no dropout. Written into every export so LLaDA's configuration
# class, whose defaults differ for almost every one of them, builds the same network.
RELEASE_ARCHITECTURE: dict[str, Any] = {
    "model_type": "llada",
    "architectures": ["LLaDAModelLM"],
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "rope": True,
    "rope_full_precision": True,
    "alibi": False,
    "alibi_bias_max": 8.0,
    "include_bias": False,
    "include_qkv_bias": False,
    "multi_query_attention": None,
    "clip_qkv": None,
    "input_emb_norm": False,
    "scale_logits": False,
    "block_group_size": 1,
    "attention_dropout": 0.0,
    "residual_dropout": 0.0,
    "embedding_dropout": 0.0,
    "flash_attention": False,
    "use_cache": False,
}


def check_supported(data: Mapping[str, Any], source: str) -> None:
    """Raises :class:`CheckpointError` when ``data`` (a config.json mapping) asks for a network we do not build
    (the table is the shipped configuration file's, so both refuse the same folders); an absent key is read as
    our network's (exports written before every key was stated lack them)."""
    problems = unsupported_settings(data)
    if problems:
        raise CheckpointError(
            f"{source}: {'; '.join(problems)}; composer-dlm's LLaDA implementation computes LLaDA's released "
            "network only"
        )


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in a config.json file (``LLaDAConfig.from_dict`` refuses unsupported settings)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such config file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return data


def build_config(
    cls: Callable[..., C], data: Mapping[str, Any], *, required: Sequence[str], source: str
) -> C:
    """A config dataclass ``cls`` (fields plus an ``extra`` dict) from a config.json mapping: keys that are fields
    fill them, the others go to ``extra`` (written back unchanged by an export, so a release round-trips)."""
    missing = [name for name in required if data.get(name) is None]
    if missing:
        raise CheckpointError(f"{source}: missing required field(s) {', '.join(missing)}")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}  # type: ignore[arg-type]
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    try:
        return cls(**known, extra=extra)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from None


def config_dict(config: Any) -> dict[str, Any]:
    """A config dataclass's fields and its ``extra`` keys as one mapping (what :func:`build_config` reads back)."""
    data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "extra"}
    data.update(config.extra)
    return data


def export_config(
    fields: Mapping[str, Any],
    auto_map: Mapping[str, str],
    *,
    architecture: Mapping[str, Any] = RELEASE_ARCHITECTURE,
) -> dict[str, Any]:
    """The config.json of an export: ``architecture`` (:data:`RELEASE_ARCHITECTURE` or
    :data:`MOE_RELEASE_ARCHITECTURE`), overridden by ``fields`` (the network's own values plus any keys a loaded
    release folder carried, which are kept as they were), with ``auto_map`` naming the modeling files written
    beside it (none: no ``auto_map`` key).

    ``pad_token_id`` defaults to the EOS id (as in LLaDA's release).
    """
    data = {**architecture, **fields, "auto_map": dict(auto_map)}
    if not auto_map:
        del data["auto_map"]
    if data.get("pad_token_id") is None:
        data["pad_token_id"] = data.get("eos_token_id")
    return data


# --- LLaDA-MoE (inclusionAI's LLaDA-MoE-7B-A1B, dLLM's modeling_lladamoe.py) ---------------------------------
# Its folders use Hugging Face's OLMoE-style names and keys: config.json with hidden_size, num_hidden_layers,
# num_experts, num_experts_per_tok, expert_intermediate_size, moe_layer_freq ...; tensors model.embed_tokens.weight,
# model.layers.{i}.self_attn.{q,k,v,o}_proj.weight, self_attn.{q,k}_norm.weight, input_layernorm.weight,
# post_attention_layernorm.weight, mlp.gate.weight (the router), mlp.experts.{e}.{gate,up,down}_proj.weight,
# mlp.expert_bias, shared_expert.{gate,up,down}_proj.weight (dense layers: mlp.{gate,up,down}_proj.weight),
# model.norm.weight and lm_head.weight (absent with tie_word_embeddings). Our model keeps each layer's experts
# stacked, one (num_experts, out, in) tensor per projection (``mlp.experts.gate_proj``), for grouped GEMMs.

MOE_MODEL_TYPES = ("lladamoe",)

# Keys written into every LLaDA-MoE export, for the values this implementation computes (dLLM's configuration
# class has defaults of -1 or [] for several of them, which no network can be built from).
MOE_RELEASE_ARCHITECTURE: dict[str, Any] = {
    "model_type": "lladamoe",
    "architectures": ["LLaDAMoEModelLM"],
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "clip_qkv": None,
    "rope_scaling": None,
    "partial_rotary_factor": 1.0,
    "moe_router_score_function": "softmax",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1,
    "output_router_logits": False,
    "use_cache": False,
}

# Values of LLaDA-MoE keys this implementation does not compute (dLLM's code ignores norm_topk_prob, routed
# scaling and the score function name: its router is always a softmax, top-k, unnormalised).
_MOE_SUPPORTED: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "clip_qkv": (None,),
    "rope_scaling": (None,),
    "partial_rotary_factor": (1, 1.0),
    "moe_router_score_function": ("softmax",),
}

_STACKED_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_ONE_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def is_moe_config(data: Mapping[str, Any]) -> bool:
    """Whether a config.json mapping describes LLaDA-MoE: model_type "lladamoe" (dLLM), or LLaDA-MoE's keys under
    the model_type "llada" that inclusionAI's release states (its folder ships its own modeling files)."""
    return data.get("model_type") in MOE_MODEL_TYPES or "num_experts" in data


def check_moe_supported(data: Mapping[str, Any], source: str) -> None:
    """Raises :class:`CheckpointError` when a LLaDA-MoE config.json asks for a network we do not build."""
    for key, allowed in _MOE_SUPPORTED.items():
        if data.get(key) is not None and data[key] not in allowed:
            shown = ", ".join(repr(a) for a in allowed if a is not None) or "null"
            raise CheckpointError(
                f"{source}: {key}={data[key]!r} is not supported by composer-dlm's LLaDA-MoE implementation "
                f"(supported: {shown})"
            )


def unstack_experts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our LLaDA-MoE state dict under the release's names: each stacked (num_experts, out, in) expert projection
    becomes ``num_experts`` tensors ``...mlp.experts.{e}.{proj}.weight`` (views; :func:`write_folder` copies)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        match = _STACKED_EXPERT.match(name)
        if match is None:
            out[name] = tensor
            continue
        prefix, proj = match.groups()
        for e in range(tensor.shape[0]):
            out[f"{prefix}.{e}.{proj}.weight"] = tensor[e]
    return out


def expert_slot(name: str) -> tuple[str, int] | None:
    """For a release tensor name of one expert (``model.layers.0.mlp.experts.5.up_proj.weight``), our stacked
    parameter's name and the expert's index (``model.layers.0.mlp.experts.up_proj``, 5); None for other names."""
    match = _ONE_EXPERT.match(name)
    if match is None:
        return None
    prefix, index, proj = match.groups()
    return f"{prefix}.{proj}", int(index)


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors shards of ``folder``: those its index lists, else ``model.safetensors``."""
    index = folder / SAFETENSORS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err!r})") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} lists shard(s) that are not there: {', '.join(absent)}")
        return files
    single = folder / SAFETENSORS_NAME
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle weights ({', '.join(pickles)}); composer-dlm loads safetensors only, because "
            "unpickling runs arbitrary code. Convert the folder to safetensors with a tool you trust and retry."
        )
    raise CheckpointError(f"{folder}: no {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME}")


def check_folder(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a Path, if it is a folder with a config.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; pass the Hugging Face folder holding config.json")
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{folder}: no {CONFIG_NAME}; a LLaDA checkpoint folder needs config.json next to its safetensors"
        )
    return folder


def read_tensors(
    folder: Path, device: str | torch.device = "cpu"
) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(shard, name, tensor) for every tensor of the folder, one at a time (each read when it is yielded)."""
    for shard in safetensors_files(folder):
        try:
            with safe_open(str(shard), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    yield shard, name, f.get_tensor(name)
        except SafetensorError as err:
            raise CheckpointError(
                f"{shard}: cannot be read as safetensors ({err}); the file is probably truncated or corrupt, "
                "copy or export it again"
            ) from None


ExportedTokenizer = TypeVar("ExportedTokenizer", bound="PreTrainedTokenizerBase")


def write_folder(
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    folder: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    source: str | os.PathLike[str] | None = None,
    architecture: Mapping[str, Any] = RELEASE_ARCHITECTURE,
    own_remote_code: bool = True,
) -> None:
    """Writes a LLaDA folder atomically (a temporary sibling renamed into place): config.json
    (:func:`export_config`), safetensors shards under LLaDA's tensor names (an index when there are several),
    generation_config.json, the tokenizer's files (:func:`export_tokenizer`), and the modeling files with their
    ``auto_map`` (:func:`modeling_files`: those of ``source``, the folder the run started from, when it has
    them, else composer-dlm's own, so ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` works
    without composer-dlm). Files are world-readable.

    ``config`` is the network's config.json mapping (``LLaDAConfig.to_dict()``); ``state_dict`` has LLaDA's
    tensor names. With ``weight_tying`` the output projection is not stored. A LLaDA-MoE folder passes
    ``architecture=MOE_RELEASE_ARCHITECTURE`` and its own tensor names, and ``own_remote_code=False``: composer-dlm
    has no remote code for LLaDA-MoE, so such an export ships modeling files only when ``source`` has them.
    """
    folder = Path(folder)
    limit = parse_size(max_shard_size)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if config.get("weight_tying") and name.endswith("transformer.ff_out.weight"):
            continue
        # One copy: onto the host, in the target dtype, contiguous, in storage of its own (safetensors refuses
        # shared storage, and the caller's tensors must not be aliased).
        tensors[name] = tensor.detach().to(
            device="cpu", dtype=dtype, copy=True, memory_format=torch.contiguous_format
        )
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes

    modeling, auto_map = modeling_files(
        Path(source) if source is not None else None, config, own_code=own_remote_code
    )
    data = export_config(config, auto_map, architecture=architecture)
    if tokenizer is not None:
        tokenizer = export_tokenizer(tokenizer, data)
        data["pad_token_id"] = tokenizer.pad_token_id
    first = next(iter(tensors.values()), None)
    if first is not None:
        data["torch_dtype"] = str(first.dtype).removeprefix("torch.")

    with staged_folder(folder) as tmp:
        tmp.mkdir()
        _write_json(tmp / CONFIG_NAME, data)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            _write_json(tmp / SAFETENSORS_INDEX_NAME, index)
        for path in modeling:
            shutil.copyfile(path, tmp / path.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        source_generation = Path(source) / GENERATION_CONFIG_NAME if source is not None else None
        if source_generation is not None and source_generation.is_file():
            shutil.copyfile(source_generation, tmp / GENERATION_CONFIG_NAME)
        else:
            _write_json(tmp / GENERATION_CONFIG_NAME, generation_config(data, tokenizer))
        for path in tmp.iterdir():
            path.chmod(FILE_MODE if path.is_file() else FOLDER_MODE)
        tmp.chmod(FOLDER_MODE)


def generation_config(config: Mapping[str, Any], tokenizer: object | None) -> dict[str, Any]:
    """generation_config.json from the model's special token ids (and the tokenizer's BOS, when it has one)."""
    import transformers  # the version string only; transformers is a dependency of the tokenizer stack

    data: dict[str, Any] = {"_from_model_config": True}
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        data["bos_token_id"] = bos
    data["eos_token_id"] = config.get("eos_token_id")
    data["pad_token_id"] = config.get("pad_token_id", config.get("eos_token_id"))
    data["transformers_version"] = transformers.__version__
    return data


def modeling_files(
    source: Path | None, config: Mapping[str, Any], *, own_code: bool = True
) -> tuple[list[Path], dict[str, str]]:
    """The modeling ``*.py`` files an export ships and the ``auto_map`` that points at them: those of ``source``
    (the folder the run started from, e.g. LLaDA's release) with the map of its config.json when it has both,
    else composer-dlm's own self-contained files (:mod:`composer_dlm.models.hf_remote`), or none without
    ``own_code``."""
    theirs = sorted(p for p in source.glob("*.py") if p.is_file()) if source is not None else []
    if theirs and isinstance(config.get("auto_map"), Mapping):
        return theirs, dict(config["auto_map"])
    if not own_code:
        return [], {}
    return [REMOTE_CODE / name for name in REMOTE_CODE_FILES], dict(REMOTE_AUTO_MAP)


def export_tokenizer(tokenizer: ExportedTokenizer, config: Mapping[str, Any]) -> ExportedTokenizer:
    """A copy of ``tokenizer`` as an export ships it: able to pad, and knowing the model's context.

    A tokenizer without a pad token pads with the token at config.json's ``pad_token_id`` (EOS by default, as
    LLaDA's release does); one that has a pad token keeps it, and config.json then states its id (the caller
    writes it), so the two agree. ``model_max_length`` becomes ``max_sequence_length`` (LLaDA-MoE:
    ``max_position_embeddings``), not transformers' "no limit" placeholder.
    """
    copy = deepcopy(tokenizer)
    if copy.pad_token_id is None and config.get("pad_token_id") is not None:
        copy.pad_token = copy.convert_ids_to_tokens(int(config["pad_token_id"]))
    context = config.get("max_sequence_length", config.get("max_position_embeddings"))
    if context is not None:
        copy.model_max_length = int(context)
    return copy


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def parse_size(size: int | str) -> int:
    """A shard size limit: bytes, or a string like ``"5GB"`` / ``"500MiB"``."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


# --- Hugging Face hub ids -------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_folder(name: str, what: str) -> Path:
    """A local folder for ``name``: the path itself when it exists, else, for a hub id (``GSAI-ML/LLaDA-8B-Base``),
    its snapshot in huggingface_hub's cache (``HF_HUB_CACHE`` / ``HF_HOME``). Never downloads: every rank of a
    run reads the same cache, filled beforehand with ``huggingface-cli download NAME``. ``what`` names the setting
    in errors. A name that is neither is returned as a path, for the caller's own "no such folder" message.
    """
    path = Path(name).expanduser()
    if path.exists() or not _HUB_ID.match(name):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{what}: {name!r} is neither a local folder nor in the Hugging Face cache; nothing is downloaded "
            f"during a run, so fetch it first (`huggingface-cli download {name}`) or give a local folder"
        ) from None
    except (HFValidationError, OSError) as err:
        raise CheckpointError(f"{what}: cannot read {name!r} from the Hugging Face cache ({err})") from None
