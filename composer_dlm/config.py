"""The run's YAML schema: one dataclass per section, unknown keys and wrong types rejected at every depth.

``load_config(path, overrides)`` reads the YAML with OmegaConf, merges ``dotted.key=value`` overrides,
resolves interpolations and builds :class:`TrainConfig`. Every error is a :class:`ConfigError` naming the key's
full path (``train_loader.shufle``) and, for an unknown key, the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from composer_dlm.data import LoaderConfig
from composer_dlm.diffusion import DiffusionConfig
from composer_dlm.fsutil import write_text_atomic
from composer_dlm.generate import BlockPlan, FastMode
from composer_dlm.models.llada import LLaDAConfig
from composer_dlm.models.llada_moe import LLaDAMoEConfig
from composer_dlm.models.lora import LoRAConfig
from kernels import DEFAULT_CONFIG

if TYPE_CHECKING:
    from composer.core import Time


Fp8Recipe = Literal["off", "rowwise", "tensorwise"]
RUN_CONFIG_NAME = "config.yaml"  # in the run folder: the config the run last started with


class ConfigError(ValueError):
    """A mistake in the YAML or the command-line overrides; the message names the key and the fix."""


def parse_duration(value: str, key: str) -> Time:
    """``value`` as a Composer :class:`Time`; a :class:`ConfigError` naming ``key`` when it is not a duration."""
    from composer.core import Time  # here, not at the top: reading a config does not otherwise need Composer

    try:
        return Time.from_timestring(value)
    except ValueError:
        raise ConfigError(
            f"{key}: {value!r} is not a duration; write e.g. '100ba' (batches), '1ep', '2e6tok'"
        ) from None


def batch_interval(value: str, key: str) -> int:
    """The number of batches in a callback's ``interval`` (``'500ba'``): callbacks fire when the batch count is
    a multiple of it, so another unit, or zero batches, is a :class:`ConfigError` naming ``key``. Shared by the
    config sections (so the CLI reports it before building anything) and the callbacks themselves."""
    from composer.core import TimeUnit

    interval = parse_duration(value, key)
    if interval.unit != TimeUnit.BATCH or interval.value < 1:
        raise ConfigError(f"{key} must be in batches and at least 1 (e.g. '500ba'), got {value!r}")
    return int(interval.value)


@dataclasses.dataclass
class ModelConfig:
    """Where the network comes from: a config JSON (from scratch), an inline ``config`` (the config.json fields
    of ``architecture``: LLaDA's ``d_model``... for ``llada``, LLaDA-MoE's ``hidden_size``, ``num_experts``... for
    ``llada_moe``; checked like every section), or a pretrained HF folder or hub id (``GSAI-ML/LLaDA-8B-Base``,
    read from huggingface_hub's cache), whose config.json's model_type picks the architecture.

    ``master_weights``: the dtype of the trained parameters and so of the optimizer state. ``fp32`` (default)
    whatever the checkpoint stores; ``precision`` sets only the compute dtype. ``bf16`` halves their memory, but
    updates smaller than bf16's resolution are lost (most of them at fine-tuning learning rates).

    ``load_on_gpu``: where the rank that reads ``pretrained`` puts the weights. Unset: on its GPU when the whole
    model (in ``master_weights``) takes under 80% of the GPU's free memory, so no host copy is ever made;
    otherwise on the CPU, from where FSDP moves it one block at a time. ``false`` forces the CPU.

    ``fp8``: the transformer blocks' linear layers compute in FP8 (composer_dlm/fp8.py) with scales per row
    (``rowwise``) or per tensor (``tensorwise``); parameters, checkpoints and exports stay as they are. Needs a GPU
    with FP8 tensor cores (compute capability 8.9+), ``precision: amp_bf16``, and ``compile_blocks: true`` to be
    fast (the casts are fused by torch.compile).

    ``loss_chunk_mib``: the fused loss's budget for its reused (rows x vocabulary) logits buffer, in MiB: the
    masked rows are walked in chunks that fit it. Larger is fewer chunks, a little faster, for more transient
    memory (README, "The power cap": 2 GiB against the default 512 MiB at LLaDA-8B's shape, 1.145x against
    1.12x Liger-Kernel's speed, 2.1 against 0.53 GiB). The chunking fixes the order in which d(weight) is
    summed, so a run resumed with another value continues with other rounding."""

    config_path: str | None = None
    architecture: Literal["llada", "llada_moe"] = "llada"
    config: LLaDAConfig | LLaDAMoEConfig | None = None
    pretrained: str | None = None
    master_weights: Literal["fp32", "bf16"] = "fp32"
    loss_impl: Literal["fused", "plain"] = "fused"
    compile_blocks: bool = False
    init_seed: int = 0
    load_on_gpu: bool | None = None
    lora: LoRAConfig | None = None  # adapters on a frozen pretrained base (models/lora.py)
    fp8: Fp8Recipe = "off"
    loss_chunk_mib: int = DEFAULT_CONFIG.chunk_bytes >> 20

    def __post_init__(self) -> None:
        if self.loss_chunk_mib < 1:
            raise ConfigError(
                f"model.loss_chunk_mib is the fused loss's logits buffer in MiB and must be at least 1, got "
                f"{self.loss_chunk_mib} (the default is {DEFAULT_CONFIG.chunk_bytes >> 20})"
            )
        given = [k for k in ("config_path", "config", "pretrained") if getattr(self, k) is not None]
        if len(given) > 1:
            # A YAML sets one (the quickstart sets model.config) and an override adds another: say which to drop.
            drop = " ".join(f"model.{k}=null" for k in given if k != given[-1])
            raise ConfigError(
                f"model: {' and '.join(f'model.{k}' for k in given)} are both set, but a model comes from exactly "
                f"one of them; to use model.{given[-1]}, add `{drop}` to the command line (or remove it from the YAML)"
            )
        if not given:
            raise ConfigError(
                "model: set one of model.config_path (JSON, from scratch), model.config (inline) or "
                "model.pretrained (Hugging Face folder)"
            )
        wanted = LLaDAMoEConfig if self.architecture == "llada_moe" else LLaDAConfig
        if self.config is not None and not isinstance(self.config, wanted):
            raise ConfigError(
                f"model.config has the keys of {type(self.config).__name__} but model.architecture is "
                f"{self.architecture!r}; set model.architecture={'llada_moe' if self.architecture == 'llada' else 'llada'}"
            )
        if self.lora is not None and self.pretrained is None:
            raise ConfigError("model.lora adapts a pretrained model: set model.pretrained to its folder")
        if self.lora is not None and self.fp8 != "off":
            raise ConfigError(
                "model.fp8 with model.lora is not supported (the adapters wrap the linear layers FP8 would "
                "replace); set model.fp8: off"
            )


@dataclasses.dataclass
class TokenizerConfig:
    name: str = "embedded"


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 3e-4
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    fused: bool | None = None  # None: fused on GPU (not under FSDP with amp_fp16), plain on CPU

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas}")


@dataclasses.dataclass
class SchedulerConfig:
    """``cosine``: linear warmup then cosine to alpha_f; ``wsd``: warmup, constant, then a linear decay over the
    last ``decay_fraction`` of training (LLaDA's schedule); ``constant``: warmup then constant."""

    name: Literal["cosine", "wsd", "constant", "linear"] = "cosine"
    t_warmup: str = "0ba"
    alpha_f: float = 0.1
    decay_fraction: float = 0.1

    def __post_init__(self) -> None:
        parse_duration(self.t_warmup, "scheduler.t_warmup")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"scheduler.decay_fraction must be in (0, 1], got {self.decay_fraction}")


@dataclasses.dataclass
class FSDPConfig:
    """Composer's FSDP settings (``parallelism_config.fsdp``). HYBRID_SHARD shards within groups of
    ``data_parallel_shard_degree`` processes and replicates over ``data_parallel_replicate_degree`` of them
    (e.g. the GPUs of a node x the nodes); Composer turns it into FULL_SHARD without a replicate degree."""

    sharding_strategy: Literal["FULL_SHARD", "HYBRID_SHARD", "SHARD_GRAD_OP", "NO_SHARD"] = "FULL_SHARD"
    data_parallel_shard_degree: int = -1  # -1: the processes left after replication
    data_parallel_replicate_degree: int | None = None
    mixed_precision: Literal["DEFAULT", "PURE", "FULL"] = "PURE"
    activation_checkpointing: bool = False
    activation_cpu_offload: bool = False
    state_dict_type: Literal["full", "sharded"] = "full"
    limit_all_gathers: bool = True
    use_orig_params: bool = True
    # Rank 0 of each node reads the weights (straight onto its GPU) or initialises them, and FSDP broadcasts them
    # while sharding; the other ranks build the model on the meta device, so a node reads the folder once.
    sync_module_states: bool = True

    def __post_init__(self) -> None:
        if self.sharding_strategy == "HYBRID_SHARD" and self.data_parallel_replicate_degree is None:
            raise ConfigError(
                "fsdp.sharding_strategy HYBRID_SHARD needs fsdp.data_parallel_replicate_degree (the number of "
                "replicas, e.g. nodes; Composer would otherwise run FULL_SHARD); set it, or use FULL_SHARD"
            )


@dataclasses.dataclass
class CheckpointConfig:
    """``save: false`` writes no checkpoints at all (benchmarks); nothing can then be resumed. ``lock: false`` runs
    without the run folder's lock (composer_dlm/run_lock.py), for filesystems where neither flock nor an exclusive
    create works; two runs in one folder are then yours to prevent."""

    save: bool = True
    lock: bool = True
    save_interval: str = "500ba"
    save_num_checkpoints_to_keep: int = 2
    autoresume: bool = True
    load_path: str | None = None
    load_weights_only: bool = False
    trusted_load_paths: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        parse_duration(self.save_interval, "checkpoint.save_interval")


@dataclasses.dataclass
class HFExportConfig:
    """``{folder}/final`` when training ends, and ``{folder}/ba{N}`` every ``interval`` so that a running run can
    be sampled (``scripts/generate.py RUN``); only the newest ``keep`` of those stay (null: all)."""

    interval: str | None = None  # also at the end of training
    folder: str = "hf"  # relative to the run folder
    keep: int | None = 2
    # LoRA runs only: true writes the adapters merged into a full LLaDA folder, false a peft adapter folder.
    merge: bool = False

    def __post_init__(self) -> None:
        if self.interval is not None:
            batch_interval(self.interval, "callbacks.hf_export.interval")
        if self.keep is not None and self.keep < 1:
            raise ConfigError(
                f"callbacks.hf_export.keep must be >= 1 (or null to keep every export), got {self.keep}"
            )


@dataclasses.dataclass
class SamplesConfig:
    interval: str = "100ba"
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["The"])
    gen_length: int = 32
    steps: int = 32
    block_length: int | None = None
    # Wrap each prompt in the tokenizer's chat template (as a user turn, with the assistant prompt after it);
    # 'auto': in SFT runs when the tokenizer has a template.
    chat_template: bool | Literal["auto"] = "auto"
    # Fast mode (composer_dlm.generate.FastMode): KV cache "prefix" / "dual", threshold or factor parallel decoding.
    cache: Literal["prefix", "dual"] | None = None
    threshold: float | None = None
    factor: float | None = None

    def __post_init__(self) -> None:
        batch_interval(self.interval, "callbacks.samples.interval")
        try:
            self.fast_mode()
        except ValueError as err:
            raise ConfigError(f"callbacks.samples: {err}") from None
        # The sampler's own check (gen_length, steps and block_length fit together), here rather than at the
        # first sample, which may be thousands of batches into the run.
        BlockPlan(0, self.gen_length, self.block_length or self.gen_length, self.steps)

    def fast_mode(self) -> FastMode | None:
        """The sampler's fast mode, or None (exact mode) when none of its settings is given."""
        if self.cache is None and self.threshold is None and self.factor is None:
            return None
        return FastMode(cache=self.cache, threshold=self.threshold, factor=self.factor)


@dataclasses.dataclass
class NaNGuardConfig:
    max_consecutive: int = 5

    def __post_init__(self) -> None:
        if self.max_consecutive < 1:
            raise ConfigError(f"callbacks.nan_guard.max_consecutive must be >= 1, got {self.max_consecutive}")


@dataclasses.dataclass
class LikelihoodEvalConfig:
    """Multiple-choice accuracy by Monte-Carlo likelihood; ``data`` is a JSONL of {prompt, choices, answer}."""

    data: str
    interval: str = "500ba"
    num_samples: int = 32
    max_examples: int | None = None

    def __post_init__(self) -> None:
        batch_interval(self.interval, "callbacks.likelihood_eval.interval")
        if self.num_samples < 1:
            raise ConfigError(f"callbacks.likelihood_eval.num_samples must be >= 1, got {self.num_samples}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(
                f"callbacks.likelihood_eval.max_examples must be >= 1 or null (all), got {self.max_examples}"
            )


@dataclasses.dataclass
class LMEvalConfig:
    """lm-evaluation-harness ``tasks`` on the model in memory every ``interval`` (needs the ``eval`` extra);
    the scoring and sampler settings are those of ``python -m composer_dlm.eval``'s ``--model_args``."""

    tasks: list[str]
    interval: str = "1000ba"
    include_path: str | None = None  # a folder of task YAMLs of your own
    include_defaults: bool = True  # false: only include_path's tasks (skips indexing lm-eval's, ~20 s)
    limit: int | None = None  # documents per task (all when null)
    num_fewshot: int | None = None
    mc_num: int = 128
    batch_size: int = 32
    cfg_scale: float = 0.0
    gen_length: int | None = None
    steps: int | None = None
    block_length: int | None = None
    seed: int = 1234

    def __post_init__(self) -> None:
        batch_interval(self.interval, "callbacks.lm_eval.interval")
        if not self.tasks:
            raise ConfigError("callbacks.lm_eval.tasks is empty: name at least one lm-eval task")
        for name in ("mc_num", "batch_size", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"callbacks.lm_eval.{name} must be >= 1, got {value}")
        if self.cfg_scale < 0:
            raise ConfigError(f"callbacks.lm_eval.cfg_scale must be >= 0, got {self.cfg_scale}")


@dataclasses.dataclass
class CallbacksConfig:
    speed_window: int = 10
    lr_monitor: bool = True
    memory_monitor: bool = True
    runtime_estimator: bool = True
    hf_export: HFExportConfig | None = dataclasses.field(default_factory=HFExportConfig)
    samples: SamplesConfig | None = dataclasses.field(default_factory=SamplesConfig)
    nan_guard: NaNGuardConfig | None = dataclasses.field(default_factory=NaNGuardConfig)
    likelihood_eval: LikelihoodEvalConfig | None = None
    lm_eval: LMEvalConfig | None = None

    def __post_init__(self) -> None:
        if self.speed_window < 1:
            raise ConfigError(f"callbacks.speed_window must be >= 1, got {self.speed_window}")


@dataclasses.dataclass
class LoggingConfig:
    """The console shows a progress bar (on a terminal) and one compact line every ``console_interval``; with
    ``plot`` the run ends by drawing its train loss and eval ELBO to ``{run}/plots/loss.png``."""

    console_interval: str = "10ba"
    progress_bar: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        batch_interval(self.console_interval, "logging.console_interval")


@dataclasses.dataclass
class FileLoggerConfig:
    """Every metric as text in ``{run}/logs/rank{R}-{start time}-pid{P}.txt``, one file per start."""

    flush_interval: int = 1  # batches between flushes to disk


@dataclasses.dataclass
class TensorBoardConfig:
    """TensorBoard event files (extra ``tensorboard``)."""

    log_dir: str | None = None  # default: {run}/tensorboard
    flush_interval: int = 100  # batches between flushes to disk


@dataclasses.dataclass
class WandBConfig:
    """Weights & Biases (extra ``wandb``); ``mode: offline`` writes the run to ``{dir}/wandb/`` for a later
    ``wandb sync``, without network or login."""

    project: str | None = None
    entity: str | None = None
    name: str | None = None  # default: run_name
    group: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] = "online"
    dir: str | None = None  # default: the run folder


@dataclasses.dataclass
class MLflowConfig:
    """MLflow (extra ``mlflow``): a tracking server URI, ``databricks``, or a local ``file:`` store."""

    tracking_uri: str | None = None  # default: MLflow's own (MLFLOW_TRACKING_URI, else ./mlruns)
    experiment: str | None = None  # default: run_name
    run_name: str | None = None  # default: run_name
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    flush_interval: int = 10  # batches between flushes
    log_system_metrics: bool = False  # MLflow's CPU/GPU/memory monitor thread
    resume: bool = True  # a restarted run continues the MLflow run of its name (false: a new MLflow run)


@dataclasses.dataclass
class LoggersConfig:
    """Composer's logger destinations, each given every metric: ``file`` is on unless set to null; the others
    are off until given a mapping (``{}`` takes its defaults)."""

    file: FileLoggerConfig | None = dataclasses.field(default_factory=FileLoggerConfig)
    tensorboard: TensorBoardConfig | None = None
    wandb: WandBConfig | None = None
    mlflow: MLflowConfig | None = None


@dataclasses.dataclass
class TrainConfig:
    """The whole run. Outputs go to ``{base_path}/{run_name}`` (checkpoints, HF export, logs, samples)."""

    run_name: str
    model: ModelConfig
    train_loader: LoaderConfig
    max_duration: str
    max_seq_len: int
    global_train_batch_size: int
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    eval_loader: LoaderConfig | None = None
    base_path: str = "runs"
    seed: int = 17
    device_train_microbatch_size: int | Literal["auto"] = "auto"
    device_eval_batch_size: int = 8
    eval_interval: str = "500ba"
    eval_subset_num_batches: int = -1
    precision: Literal["fp32", "amp_bf16", "amp_fp16"] = "amp_bf16"
    grad_clip_norm: float | None = 1.0
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    fsdp: FSDPConfig | None = None
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    callbacks: CallbacksConfig = dataclasses.field(default_factory=CallbacksConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    loggers: LoggersConfig = dataclasses.field(default_factory=LoggersConfig)
    dist_timeout: float = 600.0
    # Composer's deterministic mode (deterministic torch algorithms, a fixed cuBLAS workspace): a GPU run killed
    # and resumed then ends bit-identical to the uninterrupted one, at some cost in speed.
    deterministic: bool = False

    def __post_init__(self) -> None:
        max_duration = parse_duration(self.max_duration, "max_duration")
        parse_duration(self.eval_interval, "eval_interval")
        if self.scheduler.name == "wsd":
            from composer_dlm.schedulers import check_warmup_unit

            warmup = parse_duration(self.scheduler.t_warmup, "scheduler.t_warmup")
            try:
                check_warmup_unit(warmup, max_duration)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if self.max_seq_len <= 0:
            raise ConfigError(f"max_seq_len must be positive, got {self.max_seq_len}")
        if self.global_train_batch_size <= 0:
            raise ConfigError(f"global_train_batch_size must be positive, got {self.global_train_batch_size}")

    @property
    def run_folder(self) -> Path:
        return Path(self.base_path) / self.run_name

    @property
    def run_config_file(self) -> Path:
        """The run's resolved config, written at each start (see :func:`write_run_config`)."""
        return self.run_folder / RUN_CONFIG_NAME

    @property
    def checkpoint_folder(self) -> Path:
        """Where Composer saves checkpoints, and so where a restart repairs and autoresumes from."""
        return self.run_folder / "checkpoints"


# --- building dataclasses from plain data ------------------------------------------------------------------


def build(cls: type, data: Any, path: str = "") -> Any:
    """Builds dataclass ``cls`` from a mapping, checking keys and types recursively; errors name ``path``."""
    where = path or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{full}'{hint}")
        kwargs[key] = _coerce(hints[key], value, full)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _coerce(option, value, path)
            except ConfigError as err:
                errors.append(str(err))
        sections = [o for o in options if isinstance(o, type) and dataclasses.is_dataclass(o)]
        if isinstance(value, dict) and len(sections) == len(options):
            # Sections of different schemas (model.config of either architecture): the error of the one whose
            # keys the mapping shares most, so a typo is named rather than the whole mapping refused.
            shared = [len(set(value) & {f.name for f in dataclasses.fields(o)}) for o in sections]
            raise ConfigError(errors[shared.index(max(shared))])
        raise ConfigError(errors[-1] if len(errors) == 1 else f"{path}: {value!r} does not fit {_name(hint)}")
    if origin is Literal:
        # YAML 1.1 (OmegaConf) reads a bare `off` / `on` as a boolean: take it back as the word where that is an option.
        if isinstance(value, bool) and ("on" if value else "off") in args:
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, {} if value is None else value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):  # e.g. train_loader.streams.<name>
            return {k: _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
        return value
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{path}: expected {_name(hint)}, got {type(value).__name__} {value!r}")


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Reads a YAML file, applies ``key.sub=value`` overrides, and validates it into a :class:`TrainConfig`."""
    path = Path(path)
    cfg = read_yaml(path)
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key.sub=value; got {', '.join(bad)}")
    try:
        merged = OmegaConf.merge(cfg, _parse_overrides(overrides)) if overrides else cfg
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {_one_line(err)}") from None
    return build(TrainConfig, data)


def _parse_overrides(overrides: list[str]) -> Any:
    """The overrides as one config; a ConfigError naming the one that is not valid YAML
    (``optimizer.betas=[0.9``) rather than blaming the config file."""
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        error = err
    for override in overrides:  # find the one at fault
        try:
            OmegaConf.from_dotlist([override])
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise ConfigError(f"override {override!r}: {_one_line(err)}") from None
    raise ConfigError(f"overrides {' '.join(overrides)}: {_one_line(error)}")


def _one_line(err: Exception) -> str:
    """YAML and OmegaConf messages span several lines; errors here are one paragraph."""
    return " ".join(str(err).split())


def write_run_config(cfg: TrainConfig) -> None:
    """``cfg`` as YAML in ``{run_folder}/config.yaml`` (replaced atomically): a record of what ran, and how
    ``scripts/generate.py`` knows a checkpoint's tokenizer and whether its run was SFT."""
    write_text_atomic(cfg.run_config_file, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """``OmegaConf.load(path)``, with a missing file or invalid YAML a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: {_one_line(err)}") from None


def describe(cls: type = TrainConfig, indent: str = "") -> str:
    """Every key of ``cls`` with its type and default, sections nested: ``train.py --help`` prints it, so the
    reference always matches the schema. A section whose default is null is shown with its keys as well."""
    lines = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        options = (hint, *typing.get_args(hint))  # a section may be optional: `X | None`
        sections = [a for a in options if isinstance(a, type) and dataclasses.is_dataclass(a)]
        section = sections[0] if sections else None
        if field.default is not dataclasses.MISSING:
            default = f" = {field.default!r}"
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
            default = "" if dataclasses.is_dataclass(value) else f" = {value!r}"
        else:
            default = " (required)"
        if section is None:
            lines.append(f"{indent}{field.name}: {_type_text(hint)}{default}")
            continue
        doc = " ".join((section.__doc__ or "").split()).split(". ")[0].rstrip(".")
        generated = doc.startswith(f"{section.__name__}(")  # dataclasses write a signature when undocumented
        note = f"  # {doc}" if doc and not generated else ""
        lines.append(f"{indent}{field.name}:{' (default null)' if default == ' = None' else ''}{note}")
        lines.append(describe(section, indent + "  "))
        for other in sections[1:]:  # another schema of the same key (model.config of LLaDA-MoE)
            lines.append(f"{indent}{field.name}:  # or, as {other.__name__}")
            lines.append(describe(other, indent + "  "))
    return "\n".join(lines)


def _type_text(hint: Any) -> str:
    """``int | None``, ``'fp32' | 'bf16'``, ``list[str]``: types as a YAML writer reads them."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_text(a) for a in args)
    if origin is list:
        return f"list[{_type_text(args[0])}]" if args else "list"
    if origin is dict or hint is dict:
        return "mapping"
    return _name(hint)
