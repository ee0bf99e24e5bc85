"""Named builders: the run's config -> tokenizer, model, loaders, optimizer, schedule, callbacks, Trainer.

Each takes the config section it needs; ``build_trainer`` assembles them. ``composer_dlm/train.py`` is the
thin entry point around it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, MemoryMonitor, RuntimeEstimator, SpeedMonitor
from composer.core import Callback, Evaluator
from composer.loggers import FileLogger, LoggerDestination, WandBLogger
from composer.optim import (
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    LinearWithWarmupScheduler,
)
from composer.utils import dist, reproducibility
from transformers import PreTrainedTokenizerBase

from composer_dlm.callbacks.console import ConsoleProgress
from composer_dlm.callbacks.hf_export import HuggingFaceExport, reached_max_duration
from composer_dlm.callbacks.loss_plot import LossCurves
from composer_dlm.callbacks.nan_guard import NaNGuard
from composer_dlm.callbacks.noise_clock import NoiseClock
from composer_dlm.callbacks.samples import SampleText
from composer_dlm.checkpoints import (
    CheckpointManifests,
    CheckpointRetention,
    RunIdentity,
    check_resume,
    prune_checkpoints,
    repair_checkpoint_folder,
)
from composer_dlm.config import (
    ConfigError,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
    batch_interval,
    write_run_config,
)
from composer_dlm.data import build_dataloader, load_tokenizer, mask_token_id
from composer_dlm.data.streams import stream_hyperparameters
from composer_dlm.data.tokenizer import tokenizer_fingerprint
from composer_dlm.fp8 import check_fp8_device, convert_to_fp8
from composer_dlm.models.architectures import (
    AnyConfig,
    config_from_dict,
    config_from_json,
    from_config,
    from_pretrained,
)
from composer_dlm.models.composer_llada import ComposerLLaDA
from composer_dlm.models.hf_format import CONFIG_NAME, resolve_folder
from composer_dlm.models.lora import apply_lora, drop_frozen_weights
from composer_dlm.parallel import parallelize
from composer_dlm.run_lock import LockUnavailableError, RunLock, RunLockedError
from composer_dlm.schedulers import WarmupStableDecayScheduler

log = logging.getLogger("composer_dlm")


def build_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    return load_tokenizer(cfg.tokenizer.name)


def pretrained_folder(cfg: TrainConfig) -> Path | None:
    """The local folder of ``model.pretrained`` (a hub id resolved through huggingface_hub's cache), or None."""
    if cfg.model.pretrained is None:
        return None
    return resolve_folder(cfg.model.pretrained, "model.pretrained")


def receives_weights(cfg: TrainConfig) -> bool:
    """Whether this rank builds the model on the meta device and gets its weights from FSDP's broadcast
    (``fsdp.sync_module_states``): every rank but local rank 0, so a node reads the folder once. Not in a LoRA run
    on LLaDA-MoE's routed experts: FSDP leaves those experts out (``parallelize``) and broadcasts none of them, so
    every rank reads the folder."""
    fsdp = cfg.fsdp
    on_fsdp = fsdp is not None and fsdp.sync_module_states and torch.cuda.is_available()
    if not on_fsdp or dist.get_local_rank() == 0:
        return False
    folder = pretrained_folder(cfg)
    lora = cfg.model.lora
    return (
        lora is None
        or folder is None
        or not lora.adapts_stacked_experts(config_from_json(folder / CONFIG_NAME))
    )


def read_device(cfg: TrainConfig, folder: Path, dtype: torch.dtype) -> torch.device:
    """Where the rank that reads a pretrained folder puts the weights (``model.load_on_gpu``): its own GPU when
    the model fits there with room to spare, so tensors go from the page cache to the GPU one at a time and no host
    copy is held (8B in fp32 would be 32 GB of host RAM); the CPU otherwise."""
    if not torch.cuda.is_available() or cfg.model.load_on_gpu is False:
        return torch.device("cpu")
    gpu = torch.device("cuda", dist.get_local_rank())
    if cfg.model.load_on_gpu:
        return gpu
    need = config_from_json(folder / CONFIG_NAME).num_params() * dtype.itemsize
    free, _ = torch.cuda.mem_get_info(gpu)
    return gpu if need < 0.8 * free else torch.device("cpu")


def network_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> AnyConfig:
    """The network a run of this ``model:`` section trains, of the architecture its config names:
    ``model.pretrained``'s config.json (its model_type), or from scratch ``model.config`` (``model.architecture``)
    / ``model.config_path`` with the tokenizer's mask and EOS ids written in. (Also how ``scripts/generate.py``
    shapes the model of a run's ``.pt`` checkpoint from the run's config.yaml.)"""
    if cfg.pretrained is not None:
        config = config_from_json(resolve_folder(cfg.pretrained, "model.pretrained") / CONFIG_NAME)
        if config.mask_token_id is None:  # LLaDA-MoE's config.json may leave the mask to the tokenizer
            config.mask_token_id = mask_token_id(tokenizer)
        return config
    if cfg.config is not None:
        fields, source = cfg.config.to_dict(), "model.config"
    else:
        assert cfg.config_path is not None
        fields, source = config_from_json(cfg.config_path).to_dict(), cfg.config_path
    fields["mask_token_id"] = mask_token_id(tokenizer)
    if tokenizer.eos_token_id is not None:
        fields["eos_token_id"] = tokenizer.eos_token_id
    return config_from_dict(fields, source=source)


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> ComposerLLaDA:
    """From a pretrained HF folder, or from scratch with the tokenizer's mask/EOS ids written into the config.

    Parameters are ``model.master_weights`` (fp32 by default) whatever the folder stores. See
    :func:`receives_weights` for the ranks that start on the meta device."""
    check_fp8_device(cfg.model.fp8, run_precision(cfg))  # before anything is read or built
    mask_id = mask_token_id(tokenizer)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.model.master_weights]
    if cfg.model.lora is not None:  # the base is frozen: no masters, loaded straight in the compute dtype
        dtype = lora_base_dtype(cfg)
    device = "meta" if receives_weights(cfg) else None
    folder = pretrained_folder(cfg)
    if folder is not None:
        model = from_pretrained(folder, dtype=dtype, device=device or read_device(cfg, folder, dtype))
        if model.config.mask_token_id is None:  # LLaDA-MoE's config.json may leave the mask to the tokenizer
            model.config.mask_token_id = mask_id
        if model.config.mask_token_id != mask_id:
            raise ConfigError(
                f"model.pretrained: {cfg.model.pretrained} uses mask_token_id {model.config.mask_token_id} but the "
                f"tokenizer '{cfg.tokenizer.name}' has mask id {mask_id}; use the model's own tokenizer"
            )
    else:
        config = network_config(cfg.model, tokenizer)
        model = from_config(config, seed=cfg.model.init_seed, device=device).to(dtype)
    assert model.config.embedding_size is not None  # filled in by LLaDAConfig.__post_init__
    if len(tokenizer) > model.config.embedding_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {model.config.embedding_size} "
            "rows; raise model.config.vocab_size/embedding_size or use the model's tokenizer"
        )
    if cfg.model.lora is not None:
        assert folder is not None  # ModelConfig requires model.pretrained
        try:
            apply_lora(
                model,
                cfg.model.lora,
                base_dtype=dtype,
                seed=cfg.model.init_seed,
                base_model=str(folder.resolve()),
            )
        except ValueError as err:  # target names of the other architecture, dropout on LLaDA-MoE's experts
            raise ConfigError(f"model.lora: {err}") from None
    if cfg.model.fp8 != "off":  # a module swap, before torch.compile and FSDP see the blocks
        count = convert_to_fp8(model, cfg.model.fp8)
        log.info("model.fp8: %d linear layers compute in FP8 (%s scales)", count, cfg.model.fp8)
        if not cfg.model.compile_blocks:
            log.warning(
                "model.fp8 without model.compile_blocks: the FP8 casts run unfused and cost more than FP8 saves"
            )
    if cfg.model.compile_blocks:
        for block in model.blocks:
            block.compile()
    return ComposerLLaDA(
        model,
        cfg.diffusion,
        mask_token_id=mask_id,
        loss_impl=cfg.model.loss_impl,
        loss_chunk_mib=cfg.model.loss_chunk_mib,
        seed=cfg.seed,
    )


def run_precision(cfg: TrainConfig) -> str:
    """The precision the run computes in: ``precision``, or fp32 on a machine without a GPU."""
    return cfg.precision if torch.cuda.is_available() else "fp32"


def lora_base_dtype(cfg: TrainConfig) -> torch.dtype:
    """The frozen base of a LoRA run is stored in the dtype the run computes in: no fp32 copy under AMP."""
    return {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(run_precision(cfg), torch.float32)


def device_batch_size(cfg: TrainConfig) -> int:
    """The per-process batch; refused unless the processes split the global batch, and the micro-batch it."""
    world = dist.get_world_size()
    if cfg.global_train_batch_size % world:
        raise ConfigError(
            f"global_train_batch_size ({cfg.global_train_batch_size}) is not divisible by the number of processes "
            f"({world}); choose a multiple of {world}"
        )
    batch = cfg.global_train_batch_size // world
    micro = cfg.device_train_microbatch_size
    if micro != "auto" and batch % micro:
        raise ConfigError(
            f"device_train_microbatch_size ({micro}) does not divide the per-process batch ({batch} = "
            f"global_train_batch_size {cfg.global_train_batch_size} / {world} processes); choose a divisor of "
            f"{batch}, or 'auto'"
        )
    return batch


def build_optimizer(
    cfg: OptimizerConfig, model: torch.nn.Module, *, sharded_fp16: bool = False
) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norm weights (1-D) do not. Fused on GPU unless configured otherwise.

    ``sharded_fp16`` (FSDP with amp_fp16): torch's ShardedGradScaler hands the optimizer a one-element
    ``found_inf`` that fused AdamW cannot subtract from its 0-d step counters ("output with shape [] doesn't
    match the broadcast shape [1]" at the first step), so the default there is the foreach implementation."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    if cfg.fused and sharded_fp16:
        raise ConfigError(
            "optimizer.fused: true fails under fsdp with precision amp_fp16 (torch's ShardedGradScaler and fused "
            "AdamW disagree on a tensor shape); leave optimizer.fused unset, or use precision amp_bf16"
        )
    fused = torch.cuda.is_available() and not sharded_fp16 if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        fused=fused,
    )


def build_scheduler(cfg: SchedulerConfig):
    if cfg.name == "cosine":
        return CosineAnnealingWithWarmupScheduler(t_warmup=cfg.t_warmup, alpha_f=cfg.alpha_f)
    if cfg.name == "linear":
        return LinearWithWarmupScheduler(t_warmup=cfg.t_warmup, alpha_f=cfg.alpha_f)
    if cfg.name == "constant":
        return ConstantWithWarmupScheduler(t_warmup=cfg.t_warmup)
    return WarmupStableDecayScheduler(
        t_warmup=cfg.t_warmup, decay_fraction=cfg.decay_fraction, alpha_f=cfg.alpha_f
    )


def samples_chat_template(setting: bool | str, mode: str, tokenizer: PreTrainedTokenizerBase) -> bool:
    """``callbacks.samples.chat_template`` resolved: ``auto`` is on in SFT runs whose tokenizer has a template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting == "auto":
        return mode == "sft" and has_template
    if setting and not has_template:
        raise ConfigError(
            "callbacks.samples.chat_template is true but the tokenizer has no chat template; set it to false "
            "or auto, or use a tokenizer with one"
        )
    return bool(setting)


def build_callbacks(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> list[Callback]:
    c = cfg.callbacks
    callbacks: list[Callback] = [NoiseClock(), SpeedMonitor(window_size=c.speed_window)]
    if c.lr_monitor:
        callbacks.append(LRMonitor())
    if c.memory_monitor and torch.cuda.is_available():
        callbacks.append(MemoryMonitor())
    if c.runtime_estimator:
        callbacks.append(RuntimeEstimator())
    if c.nan_guard is not None:
        callbacks.append(NaNGuard(c.nan_guard.max_consecutive))
    if c.hf_export is not None:
        callbacks.append(
            HuggingFaceExport(
                cfg.run_folder / c.hf_export.folder,
                c.hf_export.interval,
                tokenizer=tokenizer,
                source=pretrained_folder(cfg),
                merge=c.hf_export.merge,
                keep=c.hf_export.keep,
            )
        )
    if c.samples is not None:
        s = c.samples
        callbacks.append(
            SampleText(
                tokenizer,
                s.prompts,
                interval=s.interval,
                gen_length=s.gen_length,
                steps=s.steps,
                block_length=s.block_length,
                fast=s.fast_mode(),
                mask_token_id=mask_token_id(tokenizer),
                out_file=cfg.run_folder / "samples.txt",
                chat_template=samples_chat_template(s.chat_template, cfg.diffusion.mode, tokenizer),
            )
        )
    if c.likelihood_eval is not None:
        from composer_dlm.callbacks.eval_likelihood import LikelihoodEval

        e = c.likelihood_eval
        callbacks.append(
            LikelihoodEval(
                e.data,
                tokenizer=tokenizer,
                interval=e.interval,
                num_samples=e.num_samples,
                max_examples=e.max_examples,
            )
        )
    if c.lm_eval is not None:
        try:  # lm-eval is an optional extra
            from composer_dlm.callbacks.lm_eval import LMEval
        except ModuleNotFoundError as err:
            raise ConfigError(f"callbacks.lm_eval needs lm-eval ({err}): pip install -e '.[eval]'") from None
        callbacks.append(LMEval(c.lm_eval, tokenizer))
    return callbacks


class RunWandBLogger(WandBLogger):
    """Composer's W&B logger without its checkpoint download: at autoresume Composer asks every logger for the
    run's latest checkpoint, and this one would look it up among W&B artifacts (before ``wandb.init``, so it
    raises, and offline it cannot). Our checkpoints live in the run folder; none is uploaded to W&B."""

    def download_file(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError("composer-dlm keeps checkpoints in the run folder, not in W&B")


def build_loggers(cfg: TrainConfig) -> list[LoggerDestination]:
    """Our console (a progress bar and one compact line per interval, instead of Composer's metric dumps), the
    loss-plot recorder (``logging.plot``) and the destinations of the ``loggers:`` section; every metric
    reaches each destination. A backend whose package is missing is a :class:`ConfigError` naming its extra."""
    console_interval = batch_interval(cfg.logging.console_interval, "logging.console_interval")
    loggers: list[LoggerDestination] = [
        ConsoleProgress(console_interval, progress_bar=cfg.logging.progress_bar)
    ]
    if cfg.logging.plot:
        loggers.append(LossCurves(cfg.run_folder / "plots", title=cfg.run_name))
    section = cfg.loggers
    if section.file is not None:
        # One file per start, so a resumed run keeps the logs of the attempts before it.
        started = time.strftime("%Y%m%d-%H%M%S")
        filename = str(cfg.run_folder / "logs" / f"rank{{rank}}-{started}-pid{os.getpid()}.txt")
        loggers.append(FileLogger(filename=filename, flush_interval=section.file.flush_interval))
    if section.tensorboard is not None:
        _require("tensorboard", "tensorboard")
        from composer.loggers import TensorboardLogger

        tb = section.tensorboard
        log_dir = tb.log_dir or str(cfg.run_folder / "tensorboard")
        loggers.append(TensorboardLogger(log_dir=log_dir, flush_interval=tb.flush_interval))
    if section.wandb is not None:
        _require("wandb", "wandb")
        wb = section.wandb
        loggers.append(
            RunWandBLogger(
                project=wb.project,
                entity=wb.entity,
                name=wb.name or cfg.run_name,
                group=wb.group,
                tags=wb.tags or None,
                init_kwargs={"mode": wb.mode, "dir": wb.dir or str(cfg.run_folder)},
            )
        )
    if section.mlflow is not None:
        _require("mlflow", "mlflow")
        from composer.loggers import MLFlowLogger

        mf = section.mlflow
        loggers.append(
            MLFlowLogger(
                experiment_name=mf.experiment or cfg.run_name,
                run_name=mf.run_name or cfg.run_name,
                tags=mf.tags or None,
                tracking_uri=mf.tracking_uri,
                flush_interval=mf.flush_interval,
                log_system_metrics=mf.log_system_metrics,
                resume=mf.resume,
            )
        )
    return loggers


def _require(module: str, extra: str) -> None:
    """A ConfigError naming the extra to install when ``loggers.<extra>`` is set but ``module`` is missing."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"loggers.{extra} needs the {module} package, which is not installed: pip install "
            f"'composer-dlm[{extra}]' (or remove loggers.{extra})"
        )


def resolve_load_path(cfg: TrainConfig) -> str | None:
    """Composer unpickles checkpoints, so only the run's own folder or paths listed as trusted are loaded.

    A local path must be a checkpoint file, or a checkpoint folder under ``fsdp.state_dict_type: sharded``
    (Composer writes those as folders of shards). A remote path (``s3://bucket/run/ep0-ba10-rank0.pt``) is
    loaded only when it starts with one of the trusted_load_paths (compared as text, up to a ``/``)."""
    path = cfg.checkpoint.load_path
    if path is None:
        return path
    fix = (
        "Composer checkpoints are pickles and loading one runs its code: add the folder to "
        "checkpoint.trusted_load_paths if you trust it, or import outside weights as a Hugging Face folder with "
        "model.pretrained (safetensors, no code)."
    )
    if "://" in path:
        prefixes = [p.rstrip("/") + "/" for p in cfg.checkpoint.trusted_load_paths if "://" in p]
        if "/../" in path or not any(path.startswith(prefix) for prefix in prefixes):
            raise ConfigError(
                f"checkpoint.load_path {path} is not under any of checkpoint.trusted_load_paths. {fix}"
            )
        return path
    run = cfg.run_folder.resolve()
    trusted = [Path(p).resolve() for p in cfg.checkpoint.trusted_load_paths if "://" not in p]
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(t) for t in [run, *trusted]):
        raise ConfigError(f"checkpoint.load_path {path} is outside the run folder {run}. {fix}")
    if not resolved.exists():
        raise ConfigError(f"checkpoint.load_path {path} does not exist")
    sharded = cfg.fsdp is not None and cfg.fsdp.state_dict_type == "sharded"
    if resolved.is_dir() != sharded:
        kind = "folder (fsdp.state_dict_type is sharded)" if sharded else "file"
        raise ConfigError(f"checkpoint.load_path {path} is not a checkpoint {kind}")
    return path


def start_run(cfg: TrainConfig, lock: RunLock) -> None:
    """Before anything reads or writes the run folder: initialise the process group, take the run folder's lock
    (global rank 0, unless checkpoint.lock is false; every rank raises :class:`RunLockedError` if it cannot be
    taken, so all leave together with one line), repair what a crash mid-save left and apply checkpoint retention
    to the checkpoints already there (see checkpoints.py)."""
    if not dist.is_initialized() and dist.get_world_size() > 1:
        dist.initialize_dist("gpu" if torch.cuda.is_available() else "cpu", timeout=cfg.dist_timeout)
    error: RunLockedError | None = None
    if dist.get_global_rank() == 0 and cfg.checkpoint.lock:
        try:
            lock.acquire()
        except RunLockedError as err:
            error = err
        except OSError as err:
            error = LockUnavailableError(
                f"cannot lock the run folder {cfg.run_folder} ({type(err).__name__}: {err}); fix the folder (or "
                "base_path) so this user can write it, or set checkpoint.lock=false to run without a lock"
            )
    refused = [None if error is None else str(error)]
    dist.broadcast_object_list(refused, src=0)
    if error is not None:
        raise error
    if refused[0] is not None:
        raise RunLockedError(refused[0])
    if dist.get_global_rank() == 0 and cfg.checkpoint.autoresume and cfg.checkpoint.save:
        folder = cfg.checkpoint_folder
        message = repair_checkpoint_folder(folder).message()
        if message:  # printed: Python logging is not set up until the Trainer is built
            print(f"composer-dlm: checkpoint folder {folder}: {message}", flush=True)
        prune_checkpoints(folder, cfg.checkpoint.save_num_checkpoints_to_keep)
    dist.barrier()


def check_checkpoint_to_resume(
    cfg: TrainConfig, model: ComposerLLaDA, dataset: object, identity: RunIdentity
) -> None:
    """The checkpoint Composer is about to load (the run's ``latest``, else a local ``checkpoint.load_path``)
    checked against the run as built, so a mismatch is one line at start-up (see checkpoints.check_resume)."""
    latest = cfg.checkpoint_folder / "latest-rank0.pt"
    path = cfg.checkpoint.load_path
    if cfg.checkpoint.autoresume and cfg.checkpoint.save and latest.is_file():
        source, weights_only = latest.resolve(), False
        fix_model = "give this run another run_name to start a new one"
        fix_data = (
            f"start a new run from its weights: run_name=NEW checkpoint.load_path={source} "
            f"checkpoint.load_weights_only=true checkpoint.trusted_load_paths=[{cfg.checkpoint_folder.resolve()}]"
        )
    elif path is not None and "://" not in path and Path(path).is_file():
        source, weights_only = Path(path), cfg.checkpoint.load_weights_only
        fix_model = "point checkpoint.load_path at a checkpoint of this model"
        fix_data = (
            "set checkpoint.load_weights_only=true to keep its weights and start the data from the beginning"
        )
    else:
        return
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    check_resume(
        source,
        model_state=model.state_dict(),
        frozen=frozen,
        identity=identity,
        dataset_samples=getattr(dataset, "epoch_size", None),  # Streaming's samples per epoch (subset_size)
        world_size=dist.get_world_size(),
        weights_only=weights_only,
        fix_model=fix_model,
        fix_data=fix_data,
    )


def training_complete(trainer: Trainer) -> bool:
    """Whether the run, as loaded (autoresumed), has already reached its ``max_duration``."""
    return reached_max_duration(trainer.state)


def build_trainer(cfg: TrainConfig, extra_callbacks: list[Callback] | None = None) -> Trainer:
    """The run's Trainer, autoresumed. Holds the run folder's lock until ``trainer.close()``; a run refused at
    start-up releases it and removes the run folder if this call created it (nothing half-written is left)."""
    if cfg.deterministic:  # before any CUDA work: cuBLAS reads its workspace setting when it starts
        reproducibility.configure_deterministic_mode()
    load_path = resolve_load_path(cfg)
    batch_size = device_batch_size(cfg)  # the batch geometry, checked before anything touches the disk
    created = not cfg.run_folder.exists()
    lock = RunLock(cfg.run_folder)
    try:
        start_run(cfg, lock)
        return _assemble_trainer(cfg, lock, load_path, batch_size, extra_callbacks)
    except BaseException as err:
        # Refused because another run holds the folder: it is that run's, even if it appeared just now.
        if created and dist.get_global_rank() == 0 and type(err) is not RunLockedError:
            shutil.rmtree(cfg.run_folder, ignore_errors=True)
        lock.release()
        raise


def _assemble_trainer(
    cfg: TrainConfig,
    lock: RunLock,
    load_path: str | None,
    batch_size: int,
    extra_callbacks: list[Callback] | None,
) -> Trainer:
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer)
    max_len = model.model.config.max_sequence_length
    if cfg.max_seq_len > max_len:
        raise ConfigError(
            f"max_seq_len ({cfg.max_seq_len}) is above the model's max_sequence_length ({max_len}); lower "
            f"max_seq_len to at most {max_len} (and convert the data with that --seq-len)"
        )
    train_loader = build_dataloader(
        cfg.train_loader,
        tokenizer=tokenizer,
        mode=cfg.diffusion.mode,
        max_seq_len=cfg.max_seq_len,
        device_batch_size=batch_size,
    )
    identity = RunIdentity(cfg.tokenizer.name, tokenizer_fingerprint(tokenizer))
    check_checkpoint_to_resume(cfg, model, train_loader.dataset, identity)
    evaluators = None
    if cfg.eval_loader is not None:
        eval_loader = build_dataloader(
            cfg.eval_loader,
            tokenizer=tokenizer,
            mode=cfg.diffusion.mode,
            max_seq_len=cfg.max_seq_len,
            device_batch_size=cfg.device_eval_batch_size,
        )
        evaluators = [Evaluator(label="eval", dataloader=eval_loader, metric_names=list(model.val_metrics))]
    on_gpu = torch.cuda.is_available()
    precision = run_precision(cfg)
    if precision != cfg.precision:
        log.warning("precision %s needs a GPU; using fp32 on CPU", cfg.precision)
    microbatch = cfg.device_train_microbatch_size
    if microbatch == "auto" and not on_gpu:
        microbatch = batch_size
    keep = cfg.checkpoint.save_num_checkpoints_to_keep
    trainer = Trainer(
        run_name=cfg.run_name,
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=evaluators,
        eval_interval=cfg.eval_interval,
        eval_subset_num_batches=cfg.eval_subset_num_batches,
        optimizers=build_optimizer(
            cfg.optimizer, model, sharded_fp16=cfg.fsdp is not None and precision == "amp_fp16"
        ),
        schedulers=build_scheduler(cfg.scheduler),
        max_duration=cfg.max_duration,
        device_train_microbatch_size=microbatch,
        precision=precision,
        algorithms=[GradientClipping("norm", cfg.grad_clip_norm)] if cfg.grad_clip_norm else [],
        callbacks=[lock, identity, *build_callbacks(cfg, tokenizer), *(extra_callbacks or [])],
        loggers=build_loggers(cfg),
        # parallelize: the builder step that makes the FSDP wrap / activation-checkpointing choices
        parallelism_config=parallelize(model, cfg.fsdp, on_gpu=on_gpu),
        deterministic_mode=cfg.deterministic,
        save_folder=str(cfg.checkpoint_folder) if cfg.checkpoint.save else None,
        save_interval=cfg.checkpoint.save_interval,
        save_num_checkpoints_to_keep=-1 if keep > 0 else keep,  # > 0: CheckpointRetention below
        autoresume=cfg.checkpoint.autoresume and cfg.checkpoint.save,
        load_path=load_path,
        load_weights_only=cfg.checkpoint.load_weights_only,
        # A LoRA run checkpoints its adapters only; the frozen base is loaded from model.pretrained at each start.
        save_ignore_keys=drop_frozen_weights if cfg.model.lora is not None else None,
        load_strict_model_weights=cfg.model.lora is None,
        seed=cfg.seed,
        device="gpu" if on_gpu else "cpu",
        progress_bar=False,  # both drawn by ConsoleProgress (build_loggers)
        log_to_console=False,
        dist_timeout=cfg.dist_timeout,
        python_log_level="warning",  # Composer's info lines drown the compact console lines
    )
    stream_counts = getattr(train_loader.dataset, "stream_counts", [])  # a mixture's streams, else []
    if stream_counts:  # each stream's share of the epoch, in the run's log file
        trainer.logger.log_hyperparameters(stream_hyperparameters("train_loader", stream_counts))
    if cfg.checkpoint.save:  # after Composer's CheckpointSaver, so they see each new save
        trainer.state.callbacks.append(CheckpointManifests(cfg.checkpoint_folder))
    if cfg.checkpoint.save and keep > 0:
        trainer.state.callbacks.append(CheckpointRetention(cfg.checkpoint_folder, keep))
    if dist.get_global_rank() == 0:
        write_run_config(cfg)
    return trainer
