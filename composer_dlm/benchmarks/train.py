"""End-to-end training throughput: ``python scripts/benchmark.py train [options]`` (under ``composer -n N`` for N GPUs).

Runs the real trainer path (``composer_dlm.builders.build_trainer`` on synthetic MDS shards written on the spot)
for a fixed number of steps and reports tokens/s per GPU, MFU (model FLOPs by the standard formula,
``LLaDAConfig.training_flops``: the output projection for every token, attention included, against 989 TFLOP/s
bf16), and, labelled apart, the utilisation of the FLOPs actually executed (the fused loss projects only the
masked rows, counted in the timed steps), and peak memory. With ``--reference`` it also times, in the same process, the baseline step: the same model
with full logits + F.cross_entropy as LLaDA's guidelines write it, eager, bf16 autocast, fp32 master
weights, fused AdamW; and with ``--compile`` (the default) the same step again with its blocks compiled, so that
what torch.compile gives and what our loss gives are told apart. ``--max-micro-batch`` finds the largest micro-batch our step fits.

``--lora-r R`` fine-tunes with LoRA (rank R on every block projection, models/lora.py) instead: a random model
of the shape is first written as a bf16 release-style folder (on the GPU, cached beside the data) and is the
frozen base; ``--from-base`` fully fine-tunes that same folder (fp32 masters and AdamW state), LoRA's baseline. ``--mode sft`` trains on synthetic prompt/answer shards padded to ``--seq-len``.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import tempfile
import time
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from composer.core import Callback, State
from composer.loggers import Logger

from composer_dlm.benchmarks import H200_PEAK_FLOPS, int_list, repeats, write_json
from composer_dlm.benchmarks.loader import write_synthetic
from composer_dlm.cli import ArgumentParser
from composer_dlm.models.architectures import AnyConfig

CUDA = torch.cuda.is_available()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0


def _free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def release_trainers() -> None:
    """Free what the configurations run so far in this process hold, before the next one.

    Composer's ``Engine`` registers ``atexit.register(Engine._close, state, logger)`` and unregisters it only when
    an engine is garbage-collected unclosed, so every trainer built here (closed, or stopped by an out-of-memory
    error) kept its state (the model, the optimizer with its AdamW moments) referenced until the process ended:
    LLaDA-8B full fine-tuning at micro-batch 1 ran out of memory after micro-batch 2 only because of that. Dropping
    those hooks (the benchmark closes its trainers itself) and torch.compile's caches frees them.
    """
    from composer.core.engine import Engine

    atexit.unregister(Engine._close)
    torch._dynamo.reset()
    _free()


def _mfu(config: AnyConfig, seq_len: int, tokens_per_s: float, projected_fraction: float = 1.0) -> float:
    """FLOPs utilisation, ``LLaDAConfig.training_flops`` per token at ``seq_len`` against the bf16 peak: MFU with
    ``projected_fraction`` 1 (every token projected), the executed FLOPs' utilisation with the fraction of rows
    the loss projects."""
    per_token = config.training_flops(1, seq_len, projected_tokens=projected_fraction * seq_len) / seq_len
    return tokens_per_s * per_token / H200_PEAK_FLOPS


def _model_config(args: argparse.Namespace) -> dict:
    return {
        "d_model": args.d_model,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "mlp_hidden_size": args.mlp,
        "vocab_size": args.vocab,
        "max_sequence_length": args.seq_len,
        "rope_theta": 500000.0,
    }


class _StepTimer(Callback):
    """Composer callback: wall time between the end of batch ``warmup`` and the last batch (GPU synchronised)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None
        self.batches = 0
        self.step_s: list[float] = []  # each timed step's seconds
        self.masked: torch.Tensor | float = 0.0  # masked rows of the timed batches (summed on the device)
        self.rows = 0  # all rows (tokens) of the timed batches

    def after_forward(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) >= self.warmup and hasattr(state.outputs, "num_masked"):
            self.masked = self.masked + state.outputs.num_masked.detach()
            self.rows += state.batch["input_ids"].numel()

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        if batch < self.warmup:
            return
        _sync()
        now = time.perf_counter()
        if batch == self.warmup:
            _reset_peak()
            self.start = now
        else:
            self.step_s.append(now - (self.end or self.start or now))
            self.end, self.batches = now, batch - self.warmup


def run_ours(
    args: argparse.Namespace, data_root: Path, out_root: Path, callbacks: list[Callback] | None = None
) -> dict:
    """Our trainer on ``data_root``'s shards (:func:`bench_data`) as ``args`` say; its figures as a dict.
    ``callbacks`` are added to the run (e.g. to record its losses)."""
    from composer.utils import dist

    from composer_dlm.builders import build_trainer
    from composer_dlm.config import TrainConfig, build
    from composer_dlm.models.composer_llada import ComposerLLaDA

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_section: dict = {
        "config": _model_config(args),
        "loss_impl": args.loss_impl,
        "compile_blocks": args.compile,
        "fp8": args.fp8,
    }
    if args.lora_r or args.from_base:
        del model_section["config"]
        model_section["pretrained"] = str(_base_folder(args, data_root))
    if args.lora_r:
        model_section["lora"] = {"r": args.lora_r, "alpha": args.lora_r}
    raw = {
        "run_name": "bench",
        "base_path": str(out_root),
        "model": model_section,
        "train_loader": {
            "local": str(data_root / args.mode),
            "split": "train",
            "num_workers": 4,
            "shuffle": False,
        }
        | ({"pad_to": "max_seq_len"} if args.mode == "sft" else {}),
        "max_duration": f"{args.steps}ba",
        "max_seq_len": args.seq_len,
        "global_train_batch_size": args.micro_batch * world * args.grad_accum,
        "device_train_microbatch_size": args.micro_batch,
        "precision": "amp_bf16",
        "diffusion": {"random_length_prob": 0.0, "mode": args.mode},
        "checkpoint": {"save": False, "autoresume": False},
        "callbacks": {
            "hf_export": None,
            "samples": None,
            "speed_window": max(1, args.steps - args.warmup - 1),
        },
        "logging": {"console_interval": f"{args.steps}ba", "plot": False},
        "loggers": {"file": None},
        "eval_interval": f"{10 * args.steps}ba",
        "deterministic": args.deterministic,
    }
    if args.fsdp != "none":
        raw["fsdp"] = {
            "sharding_strategy": args.fsdp,
            "activation_checkpointing": args.ac,
            "mixed_precision": "PURE",
        }
    cfg = build(TrainConfig, raw)
    timer = _StepTimer(args.warmup)
    trainer = build_trainer(cfg, extra_callbacks=[timer, *(callbacks or [])])
    try:
        trainer.fit()
    finally:
        trainer.close()
    model = cast(ComposerLLaDA, trainer.state.model)  # build_trainer's model
    tokens_per_batch = args.micro_batch * args.grad_accum * args.seq_len  # per GPU
    assert timer.start is not None and timer.end is not None, (
        "nothing timed: needs --warmup >= 1 and --steps > --warmup"
    )
    dt = timer.end - timer.start
    tps = timer.batches * tokens_per_batch / dt
    masked_fraction = float(timer.masked) / timer.rows if timer.rows else 1.0
    projected = masked_fraction if args.loss_impl == "fused" else 1.0
    result = {
        "path": _our_path(args, world),
        "micro_batch": args.micro_batch,
        "tokens_per_s_per_gpu": tps,
        "mfu": _mfu(model.model.config, args.seq_len, tps),
        "executed_utilisation": _mfu(model.model.config, args.seq_len, tps, projected),
        "masked_fraction": masked_fraction,
        "peak_gib": _peak_gib(),
        "step_s": dt / timer.batches,
        # every timed step's tokens/s: their median and range beside the run's figure (all tokens / all time)
        "tokens_per_s_steps": repeats([tokens_per_batch / s for s in timer.step_s]),
    }
    del trainer, model
    if dist.get_world_size() > 1:
        dist.barrier()
    return result


def _our_path(args: argparse.Namespace, world: int) -> str:
    """What our configuration runs, as the results' ``path`` names it."""
    lora = f"LoRA r{args.lora_r} " if args.lora_r else ("full fine-tune " if args.from_base else "")
    fp8 = f"fp8={args.fp8}, " if args.fp8 != "off" else ""
    return (
        f"ours ({args.mode}, {lora}{args.loss_impl} loss, {fp8}compile={args.compile}, fsdp={args.fsdp}, "
        f"ac={args.ac}, world={world}{', deterministic' if args.deterministic else ''})"
    )


def _base_folder(args: argparse.Namespace, data_root: Path) -> Path:
    """The ``--lora-r`` base: a random model of the benchmark's shape, saved as LLaDA's release is (bf16
    safetensors, untied head, the embedded tokenizer's mask/EOS ids), written once by rank 0 beside the data."""
    from composer.utils import dist

    from composer_dlm.benchmarks.startup import write_random_folder

    shape = _model_config(args)
    folder = data_root.parent / "llada-{d_model}x{n_layers}-h{n_heads}-mlp{mlp_hidden_size}-bf16".format(
        **shape
    )
    if dist.get_global_rank() == 0 and not (folder / "config.json").is_file():
        write_random_folder(shape | {"weight_tying": False}, folder)
        _free()
    if dist.get_world_size() > 1:
        dist.barrier()
    return folder


def run_reference(args: argparse.Namespace, micro_batch: int, compiled: bool) -> dict:
    """LLaDA's guideline step: full logits, masked rows' CE / p_mask, sum / (B L); bf16 autocast; eager, or with
    each block ``torch.compile``-d as ours are (``compiled``), which separates what torch.compile gives from
    what our loss gives."""
    from composer_dlm.diffusion import forward_process
    from composer_dlm.models import LLaDAModel

    _free()
    device = "cuda" if CUDA else "cpu"
    model = LLaDAModel.from_config(_model_config(args) | {"mask_token_id": args.vocab - 128}).to(device)
    if compiled:
        torch.compiler.reset()  # compiled afresh, not under the guards and recompile count of the runs before
        for block in model.blocks:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        ids = torch.randint(0, args.vocab - 256, (micro_batch, args.seq_len), device=device, generator=gen)
        noisy, masked, p_mask = forward_process(ids, mask_token_id=args.vocab - 128, generator=gen)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=CUDA):
            logits = model(noisy)
        loss = (F.cross_entropy(logits[masked].float(), ids[masked], reduction="none") / p_mask[masked]).sum()
        (loss / ids.numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    oom = False
    try:
        for _ in range(args.warmup):
            step()
        _sync()
        _reset_peak()
        step_s = []  # each timed step, synchronised at its end, so the JSON keeps their range as ours does
        for _ in range(args.steps - args.warmup):
            start = time.perf_counter()
            step()
            _sync()
            step_s.append(time.perf_counter() - start)
        dt = sum(step_s)
    except torch.OutOfMemoryError:
        oom = True
    peak = _peak_gib()
    model.cpu()
    opt.state.clear()
    _free()
    how = "compiled blocks" if compiled else "eager"
    result: dict = {"path": f"reference (full logits + F.cross_entropy, {how})", "micro_batch": micro_batch}
    if oom:
        return result | {"oom": True}
    tps = (args.steps - args.warmup) * micro_batch * args.seq_len / dt
    return result | {
        "tokens_per_s_per_gpu": tps,
        "mfu": _mfu(model.config, args.seq_len, tps),
        "executed_utilisation": _mfu(model.config, args.seq_len, tps),  # full logits: every row projected
        "peak_gib": peak,
        "step_s": dt / (args.steps - args.warmup),
        "tokens_per_s_steps": repeats([micro_batch * args.seq_len / s for s in step_s]),
    }


def parser() -> ArgumentParser:
    """The train benchmark's options (also what the fp8 benchmark passes to :func:`run_ours`)."""
    p = ArgumentParser(prog="benchmark.py train", description=__doc__)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--n-layers", type=int, default=22)
    p.add_argument("--n-heads", type=int, default=32)
    p.add_argument("--mlp", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=126464)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument(
        "--micro-batches", type=int_list, default=[], help="comma list: run ours at each (largest that fits)"
    )
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument(
        "--fsdp",
        default="FULL_SHARD",
        choices=["none", "FULL_SHARD", "HYBRID_SHARD", "SHARD_GRAD_OP", "NO_SHARD"],
    )
    p.add_argument("--ac", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--deterministic", action="store_true", help="deterministic: true (its throughput cost)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile the blocks (ours; --reference then times the reference step both eager and compiled)",
    )
    p.add_argument("--loss-impl", default="fused", choices=["fused", "plain"])
    p.add_argument("--fp8", default="off", choices=["off", "rowwise", "tensorwise"], help="model.fp8")
    p.add_argument(
        "--mode", default="pretrain", choices=["pretrain", "sft"], help="diffusion.mode and shards"
    )
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank on a bf16 base folder (0: full training)")
    p.add_argument(
        "--from-base",
        action="store_true",
        help="full fine-tuning (fp32 masters) of the same bf16 base folder --lora-r uses: LoRA's baseline",
    )
    p.add_argument(
        "--reference", action="store_true", help="also time the reference step (rank 0 only, 1 GPU)"
    )
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    return p


def bench_data(args: argparse.Namespace) -> Path:
    """The synthetic shards the runs read (written by rank 0 once, cached under $CDLM_BENCH_DATA), after
    starting the process group when there are several processes."""
    from composer_dlm.data import load_tokenizer

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    samples = (args.steps + 2) * max([args.micro_batch, *args.micro_batches]) * world * args.grad_accum
    data_root = (
        Path(os.environ.get("CDLM_BENCH_DATA", "/tmp/cdlm-bench-data")) / f"seq{args.seq_len}-n{samples}"
    )
    if rank == 0 and not (data_root / args.mode / "train" / "manifest.json").exists():
        write_synthetic(
            data_root,
            mode=args.mode,
            seq_len=args.seq_len,
            num_samples=samples,
            tokenizer=load_tokenizer("embedded"),
        )
    if world > 1:
        from composer.utils import dist

        dist.initialize_dist("gpu")
        dist.barrier()
    return data_root


def print_table(args: argparse.Namespace, results: list[dict]) -> None:
    """The results as a markdown table under a line naming the shape and the device."""
    device_name = torch.cuda.get_device_name() if CUDA else "CPU"
    print(f"\nLLaDA d_model={args.d_model} layers={args.n_layers} seq={args.seq_len} on {device_name}")
    print(f"| {'path':<70} | mb | tokens/s/GPU | MFU | executed FLOPs util. | peak GiB |")
    print(f"|{'-' * 72}|----|--------------|-----|----------------------|----------|")
    for r in results:
        if r.get("oom"):
            print(f"| {r['path']:<70} | {r['micro_batch']:>2} | OOM | | | |")
        else:
            print(
                f"| {r['path']:<70} | {r['micro_batch']:>2} | {r['tokens_per_s_per_gpu']:>12,.0f} | "
                f"{100 * r['mfu']:.1f}% | {100 * r['executed_utilisation']:.1f}% | {r['peak_gib']:.1f} |"
            )


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    if not CUDA:
        print("no CUDA GPU: running on the CPU in fp32 (a smoke test; the figures mean nothing)")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    results = []
    with tempfile.TemporaryDirectory(prefix=f"cdlm-bench-{rank}-") as tmp:
        data_root = bench_data(args)
        for mb in args.micro_batches or [args.micro_batch]:
            args.micro_batch = mb
            try:
                results.append(run_ours(args, data_root, Path(tmp) / f"run{mb}"))
            except torch.OutOfMemoryError:
                results.append({"path": _our_path(args, world), "micro_batch": mb, "oom": True})
            release_trainers()  # after the handler: its traceback no longer holds run_ours's frame
        if args.reference and rank == 0:
            for compiled in (False, True) if args.compile else (False,):  # --no-compile: eager only
                for mb in (4, 8):
                    results.append(run_reference(args, mb, compiled))
    if rank != 0:
        return
    print_table(args, results)
    if args.out:
        command = "python scripts/benchmark.py train " + " ".join(argv)
        write_json(
            args.out, {"benchmark": "train", "command": command, "world_size": world, "results": results}
        )
