"""Named builders: the run's config -> tokenizer, model, loaders, optimizer, schedule, callbacks, Trainer.

Each takes the config section it needs; ``build_trainer`` assembles them. ``composer_dlm/train.py`` is the
thin entry point around it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, MemoryMonitor, RuntimeEstimator, SpeedMonitor
from composer.core import Callback, Evaluator
from composer.loggers import FileLogger, LoggerDestination
from composer.optim import (
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    LinearWithWarmupScheduler,
)
from composer.utils import dist
from transformers import PreTrainedTokenizerBase

from composer_dlm.callbacks.hf_export import HuggingFaceExport
from composer_dlm.callbacks.nan_guard import NaNGuard
from composer_dlm.callbacks.noise_clock import NoiseClock
from composer_dlm.callbacks.samples import SampleText
from composer_dlm.checkpoints import repair_checkpoint_folder
from composer_dlm.config import ConfigError, OptimizerConfig, SchedulerConfig, TrainConfig
from composer_dlm.data import build_dataloader, load_tokenizer, mask_token_id
from composer_dlm.models import LLaDAConfig, LLaDAModel
from composer_dlm.models.composer_llada import ComposerLLaDA
from composer_dlm.schedulers import WarmupStableDecayScheduler

log = logging.getLogger("composer_dlm")


def build_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    return load_tokenizer(cfg.tokenizer.name)


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> ComposerLLaDA:
    """From a pretrained HF folder, or from scratch with the tokenizer's mask/EOS ids written into the config."""
    mask_id = mask_token_id(tokenizer)
    if cfg.model.pretrained is not None:
        model = LLaDAModel.from_pretrained(cfg.model.pretrained)
        if model.config.mask_token_id != mask_id:
            raise ConfigError(
                f"model.pretrained: {cfg.model.pretrained} uses mask_token_id {model.config.mask_token_id} but the "
                f"tokenizer '{cfg.tokenizer.name}' has mask id {mask_id}; use the model's own tokenizer"
            )
    else:
        if cfg.model.config is not None:
            fields, source = dict(cfg.model.config), "model.config"
        else:
            assert cfg.model.config_path is not None
            fields, source = LLaDAConfig.from_json(cfg.model.config_path).to_dict(), cfg.model.config_path
        fields["mask_token_id"] = mask_id
        if tokenizer.eos_token_id is not None:
            fields["eos_token_id"] = tokenizer.eos_token_id
        model = LLaDAModel.from_config(LLaDAConfig.from_dict(fields, source=source), seed=cfg.model.init_seed)
    assert model.config.embedding_size is not None  # filled in by LLaDAConfig.__post_init__
    if len(tokenizer) > model.config.embedding_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {model.config.embedding_size} "
            "rows; raise model.config.vocab_size/embedding_size or use the model's tokenizer"
        )
    if cfg.model.compile_blocks:
        for block in model.blocks:
            block.compile()
    return ComposerLLaDA(
        model, cfg.diffusion, mask_token_id=mask_id, loss_impl=cfg.model.loss_impl, seed=cfg.seed
    )


def device_batch_size(cfg: TrainConfig) -> int:
    world = dist.get_world_size()
    if cfg.global_train_batch_size % world:
        raise ConfigError(
            f"global_train_batch_size ({cfg.global_train_batch_size}) is not divisible by the number of processes "
            f"({world}); choose a multiple of {world}"
        )
    return cfg.global_train_batch_size // world


def build_optimizer(cfg: OptimizerConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norm weights (1-D) do not. Fused on GPU unless configured otherwise."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    fused = torch.cuda.is_available() if cfg.fused is None else cfg.fused
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
        callbacks.append(HuggingFaceExport(cfg.run_folder / c.hf_export.folder, c.hf_export.interval))
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
                mask_token_id=mask_token_id(tokenizer),
                out_file=cfg.run_folder / "samples.txt",
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
    return callbacks


def build_loggers(cfg: TrainConfig) -> list[LoggerDestination]:
    loggers: list[LoggerDestination] = []
    if cfg.logging.log_file:
        # One file per start, so a resumed run keeps the logs of the attempts before it.
        started = time.strftime("%Y%m%d-%H%M%S")
        filename = str(cfg.run_folder / "logs" / f"rank{{rank}}-{started}-pid{os.getpid()}.txt")
        loggers.append(FileLogger(filename=filename, flush_interval=1))
    if cfg.logging.tensorboard:
        from composer.loggers import TensorboardLogger

        loggers.append(TensorboardLogger(log_dir=str(cfg.run_folder / "tensorboard")))
    if cfg.logging.wandb_project:
        from composer.loggers import WandBLogger

        loggers.append(WandBLogger(project=cfg.logging.wandb_project, name=cfg.run_name))
    return loggers


def build_parallelism(cfg: TrainConfig) -> dict | None:
    """Composer's ``parallelism_config``: FSDPConfig's fields are named as Composer's FSDP settings are."""
    if cfg.fsdp is None or not torch.cuda.is_available():
        return None
    return {"fsdp": dataclasses.asdict(cfg.fsdp)}


def resolve_load_path(cfg: TrainConfig) -> str | None:
    """Composer unpickles checkpoints, so only the run's own folder or paths listed as trusted are loaded.

    A local path must be a checkpoint file, or a checkpoint folder under ``fsdp.state_dict_type: sharded``
    (Composer writes those as folders of shards). Remote paths (``s3://...``) are left to Composer."""
    path = cfg.checkpoint.load_path
    if path is None or "://" in path:
        return path
    run = cfg.run_folder.resolve()
    trusted = [Path(p).resolve() for p in cfg.checkpoint.trusted_load_paths]
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(t) for t in [run, *trusted]):
        raise ConfigError(
            f"checkpoint.load_path {path} is outside the run folder {run}. Composer checkpoints are pickles and "
            "loading one runs its code: add the folder to checkpoint.trusted_load_paths if you trust it, or "
            "import outside weights as a Hugging Face folder with model.pretrained (safetensors, no code)."
        )
    if not resolved.exists():
        raise ConfigError(f"checkpoint.load_path {path} does not exist")
    sharded = cfg.fsdp is not None and cfg.fsdp.state_dict_type == "sharded"
    if resolved.is_dir() != sharded:
        kind = "folder (fsdp.state_dict_type is sharded)" if sharded else "file"
        raise ConfigError(f"checkpoint.load_path {path} is not a checkpoint {kind}")
    return path


def prepare_checkpoint_folder(cfg: TrainConfig) -> None:
    """Before autoresume looks for ``latest``: repair what a crash mid-save left (see checkpoints.py)."""
    if not (cfg.checkpoint.autoresume and cfg.checkpoint.save):
        return
    if not dist.is_initialized() and dist.get_world_size() > 1:
        dist.initialize_dist("gpu" if torch.cuda.is_available() else "cpu", timeout=cfg.dist_timeout)
    if dist.get_global_rank() == 0:
        folder = cfg.checkpoint_folder
        message = repair_checkpoint_folder(folder).message()
        if message:  # printed: Python logging is not set up until the Trainer is built
            print(f"composer-dlm: checkpoint folder {folder}: {message}", flush=True)
    dist.barrier()


def training_complete(trainer: Trainer) -> bool:
    """Whether the run, as loaded (autoresumed), has already reached its ``max_duration``."""
    state = trainer.state
    assert state.max_duration is not None, "build_trainer always sets max_duration"
    return state.timestamp.get(state.max_duration.unit) >= state.max_duration


def build_trainer(cfg: TrainConfig, extra_callbacks: list[Callback] | None = None) -> Trainer:
    prepare_checkpoint_folder(cfg)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer)
    batch_size = device_batch_size(cfg)
    train_loader = build_dataloader(
        cfg.train_loader,
        tokenizer=tokenizer,
        mode=cfg.diffusion.mode,
        max_seq_len=cfg.max_seq_len,
        device_batch_size=batch_size,
    )
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
    precision = cfg.precision if on_gpu else "fp32"
    if precision != cfg.precision:
        log.warning("precision %s needs a GPU; using fp32 on CPU", cfg.precision)
    microbatch = cfg.device_train_microbatch_size
    if microbatch == "auto" and not on_gpu:
        microbatch = batch_size
    cfg.run_folder.mkdir(parents=True, exist_ok=True)
    return Trainer(
        run_name=cfg.run_name,
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=evaluators,
        eval_interval=cfg.eval_interval,
        eval_subset_num_batches=cfg.eval_subset_num_batches,
        optimizers=build_optimizer(cfg.optimizer, model),
        schedulers=build_scheduler(cfg.scheduler),
        max_duration=cfg.max_duration,
        device_train_microbatch_size=microbatch,
        precision=precision,
        algorithms=[GradientClipping("norm", cfg.grad_clip_norm)] if cfg.grad_clip_norm else [],
        callbacks=build_callbacks(cfg, tokenizer) + list(extra_callbacks or []),
        loggers=build_loggers(cfg),
        parallelism_config=build_parallelism(cfg),
        save_folder=str(cfg.checkpoint_folder) if cfg.checkpoint.save else None,
        save_interval=cfg.checkpoint.save_interval,
        save_num_checkpoints_to_keep=cfg.checkpoint.save_num_checkpoints_to_keep,
        autoresume=cfg.checkpoint.autoresume and cfg.checkpoint.save,
        load_path=resolve_load_path(cfg),
        load_weights_only=cfg.checkpoint.load_weights_only,
        seed=cfg.seed,
        device="gpu" if on_gpu else "cpu",
        progress_bar=cfg.logging.progress_bar,
        log_to_console=True,
        console_log_interval=cfg.logging.console_interval,
        dist_timeout=cfg.dist_timeout,
        python_log_level="info",
    )
