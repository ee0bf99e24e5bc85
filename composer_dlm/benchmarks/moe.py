"""LLaDA-MoE training step: ``python scripts/benchmark.py moe [options]`` (one GPU).

Times the training step of a LLaDA-MoE-7B-A1B-shaped model (hidden 2048, 16 heads with q/k norms, 64 experts of
width 1024, top-8, vocabulary 157,184; ``--n-layers`` of its 16 layers, so that fp32 master weights, their
gradients and AdamW's state fit one GPU) at seq 4096 in two ways, in the same process, on the same model and
optimizer: ours (the experts as grouped GEMMs over tokens sorted by expert, no host synchronisation,
:mod:`composer_dlm.models.llada_moe`), and the reference, the same module computing its experts with a Python
loop over experts as dLLM's ``modeling_lladamoe.py`` does (``torch.where`` per expert, one small product per
expert, ``index_add_``). Both steps are the full objective of a run (:class:`ComposerLLaDA`: masking, the trunk,
the fused masked loss, the router losses), bf16 autocast, fp32 masters, fused AdamW, gradient clipping.

Reports tokens/s and MFU on active parameters (``LLaDAMoEConfig.training_flops``: the one FLOP formula of
:func:`composer_dlm.models.llada.training_flops` over the router, the top-k experts, attention and the output
projection, against 989 TFLOP/s bf16), peak memory, and the loss of one batch by both paths (same weights).
On a torch that has ``torch._grouped_mm`` ours is also timed on the pinned torch's branches
(COMPOSER_DLM_FORCE_TORCH27=1: the Triton grouped GEMM of :mod:`kernels.grouped_mm_triton`).

``--grouped-gemm`` times only the experts' grouped GEMMs instead: one projection of the release's experts
(gate/up: N 1024 x K 2048; down: N 2048 x K 1024) over ``--gemm-tokens`` tokens routed top-8 of 64 uniformly at
random, forward and forward + backward, by each path (the Triton kernel, ``torch._grouped_mm`` where torch has
it, the loop over experts of :func:`kernels.grouped_mm.grouped_mm_reference`, and one dense cuBLAS GEMM over all
the rows as an anchor), TFLOP/s over the routed rows (2·rows·N·K forward, three times that forward +
backward), then each Triton kernel at a few tile sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from composer_dlm.benchmarks import H200_PEAK_FLOPS, int_list, repeats, write_json
from composer_dlm.benchmarks.kernel import _branch, _cuda_ms
from composer_dlm.benchmarks.sampler import random_model
from composer_dlm.benchmarks.tables import central, fmt
from composer_dlm.cli import ArgumentParser
from composer_dlm.diffusion import DiffusionConfig
from composer_dlm.models.composer_llada import ComposerLLaDA
from composer_dlm.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModel, SparseMoE
from kernels.grouped_mm import GROUP_ALIGN, grouped_mm_reference
from kernels.masked_ce import forced_torch27

# LLaDA-MoE-7B-A1B's shape (the fields of its config.json this benchmark sets; the layer count is --n-layers).
# Checked 2026-12-03 without network access to the release's config.json itself (not in any stored source):
# - a vLLM port's README of LLaDA-MoE-7B-A1B (stored public text, repository not named by the index) lists
#   hidden_size 2048, num_hidden_layers 16, num_attention_heads 16, num_key_value_heads 16, num_experts 64,
#   num_experts_per_tok 8, expert_intermediate_size 1024, dense_intermediate_size 8192 (unused: moe_layer_freq is
#   all 1), rope_theta 50000, max_position_embeddings 8192, qk_layernorm true, hidden_act silu, no shared expert;
# - huggingface.co/inclusionAI/LLaDA-MoE-7B-A1B-Base/tree/main lists bf16 shards of 5 GB + 5 GB + 4.72 GB: this
#   shape with vocab_size 157,184 and 16 layers is 7,356,880,896 parameters = 14.71 GB in bf16 (126,464, LLaDA's
#   vocabulary, would give 14.46 GB), and 1.40B active without the input embedding (the card's "1.4B activated");
# - inclusionAI/dInfer (fce4e32) and llama.cpp's converter use mask id 156,895 and EOS 156,892 (below 157,184);
#   the release's configuration_lladamoe.py says model_type "llada" (dLLM's examples/llada/README.md, ca176752,
#   tells users to rewrite it to "lladamoe"), which is why hf_format.is_moe_config also keys on num_experts.
# No value differed from these sources.
RELEASE_SHAPE: dict[str, Any] = {
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "expert_intermediate_size": 1024,
    "vocab_size": 157184,
    "qk_layernorm": True,
    "rope_theta": 50000.0,
}


class LoopSparseMoE(SparseMoE):
    """The reference: dLLM's expert loop over the same stacked weights (one ``torch.where`` per expert, which
    waits for the device, one product per expert, ``index_add_`` into the output)."""

    def experts_forward(
        self, x_NH: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(x_NH)
        chosen_ENK = F.one_hot(experts_NK, self.num_experts).permute(2, 0, 1)
        w = self.experts
        for e in range(self.num_experts):
            token, slot = torch.where(chosen_ENK[e])
            h = x_NH[token]
            y = F.linear(F.silu(F.linear(h, w.gate_proj[e])) * F.linear(h, w.up_proj[e]), w.down_proj[e])
            out.index_add_(0, token, (y * weights_NK[token, slot, None]).to(x_NH.dtype))
        return out


def random_moe(config: LLaDAMoEConfig, device: torch.device, seed: int) -> LLaDAMoEModel:
    """fp32 weights drawn on ``device`` by the model's own rule (:func:`.sampler.random_model`), for training."""
    model = random_model(config, device, torch.float32, seed)
    assert isinstance(model, LLaDAMoEModel)
    return model.train()


def _set_experts(model: LLaDAMoEModel, cls: type[SparseMoE]) -> None:
    for module in model.modules():
        if isinstance(module, SparseMoE):
            module.__class__ = cls


def _compile_blocks(model: LLaDAMoEModel, compiled: bool) -> None:
    """Each block compiled afresh (as ``model.compile_blocks`` does in a run), or back to eager."""
    torch.compiler.reset()
    for block in model.blocks:
        if compiled:
            block.compile()
        else:
            block._compiled_call_impl = None  # what nn.Module.compile() set


def time_steps(
    objective: ComposerLLaDA,
    optimizer: torch.optim.Optimizer,
    batches: list[torch.Tensor],
    warmup: int,
) -> tuple[list[float], float]:
    """(the seconds of each step after ``warmup`` steps, peak GiB) over ``batches``, one step each."""
    device = batches[0].device
    seconds: list[float] = []
    for i, ids in enumerate(batches):
        if i == warmup:
            torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        objective.set_noise_step(i)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = objective({"input_ids": ids}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds, torch.cuda.max_memory_allocated(device) / 2**30


def same_batch_losses(objective: ComposerLLaDA, ids: torch.Tensor) -> dict[str, float]:
    """The loss of one batch with the same weights and noise by both expert paths (no step taken)."""
    losses = {}
    for name, cls in (("ours", SparseMoE), ("reference", LoopSparseMoE)):
        _set_experts(objective.model, cls)  # type: ignore[arg-type]
        objective.set_noise_step(10_000)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            losses[name] = float(objective({"input_ids": ids}).loss)
    return losses


GroupedFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def routed_groups(
    tokens: int, top_k: int, num_experts: int, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """(group ends (E,), buffer rows) for ``tokens`` tokens routed top-k of E uniformly at random, each group
    padded to GROUP_ALIGN rows inside a buffer of the static size tokens * k + E * GROUP_ALIGN, as
    :meth:`SparseMoE.experts_forward` lays the pairs out."""
    scores = torch.rand(tokens, num_experts, device=generator.device, generator=generator)
    counts = torch.bincount(scores.topk(top_k, dim=1).indices.flatten(), minlength=num_experts)
    ends = ((counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN).cumsum(0)
    return ends, tokens * top_k + num_experts * GROUP_ALIGN


def _grouped_paths() -> dict[str, GroupedFn]:
    from kernels import grouped_mm_triton

    paths: dict[str, GroupedFn] = {"triton grouped GEMM": grouped_mm_triton.grouped_mm}
    if hasattr(torch, "_grouped_mm"):
        paths["torch._grouped_mm"] = lambda x, w, ends: torch._grouped_mm(  # type: ignore[attr-defined]
            x, w.transpose(1, 2), offs=ends.to(torch.int32)
        )
    paths["loop over experts"] = grouped_mm_reference
    paths["anchor: one dense GEMM, all rows"] = lambda x, w, ends: x @ w[0].T
    return paths


def _median_ms(f: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``f``'s GPU work over ``reps`` runs after ``warmup`` (Triton compiles there)."""
    for _ in range(warmup):
        f()
    return statistics.median(_cuda_ms(f) for _ in range(reps))


# Tile sizes tried for each Triton kernel besides its default (BM, BN, BK, warps, stages).
PRODUCT_ALTERNATIVES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 8, 5)]
WEIGHT_GRAD_ALTERNATIVES = [
    (32, 128, 128, 8, 4),
    (64, 128, 64, 8, 4),
    (128, 128, 128, 8, 2),
    (64, 256, 128, 8, 3),
]


def _forward(fn: GroupedFn, x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return fn(x, w, ends)


def _forward_backward(
    fn: GroupedFn, x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(fn(x, w, ends), [x, w], dy)


def _time_gemm(
    n: int, k: int, ends: torch.Tensor, rows: int, routed: int, reps: int, generator: torch.Generator
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one row per path, one row per Triton kernel and tile size) for the grouped GEMM (rows, K) x (E, N, K)."""
    from kernels import grouped_mm_triton as gt

    device, num_experts = ends.device, ends.shape[0]
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16, generator=generator)
    w = (torch.randn(num_experts, n, k, device=device, generator=generator) / k**0.5).bfloat16()
    dy = torch.randn(rows, n, device=device, dtype=torch.bfloat16, generator=generator)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    flops = 2 * routed * n * k
    paths = []
    for path, fn in _grouped_paths().items():
        fwd = _median_ms(functools.partial(_forward, fn, x, w, ends), reps)
        both = _median_ms(functools.partial(_forward_backward, fn, xr, wr, ends, dy), reps)
        paths.append(
            {
                "n": n,
                "k": k,
                "path": path,
                "fwd_ms": fwd,
                "fwd_bwd_ms": both,
                "fwd_tflops": flops / fwd / 1e9,
                "fwd_bwd_tflops": 3 * flops / both / 1e9,
            }
        )
    product = [gt.GPU_16BIT.product, *(gt.Tiles(*t) for t in PRODUCT_ALTERNATIVES)]
    weight_grad = [gt.GPU_16BIT.weight_grad, *(gt.Tiles(*t) for t in WEIGHT_GRAD_ALTERNATIVES)]
    launches: list[tuple[str, list[gt.Tiles], Callable[..., torch.Tensor], tuple[Any, ...]]] = [
        ("forward", product, gt.grouped_mm_forward, (x, w, ends)),
        ("d(x)", product, gt.grouped_mm_forward, (dy, w.transpose(1, 2), ends)),
        ("d(w)", weight_grad, gt.grouped_mm_weight_grad, (dy, x, ends)),
    ]
    sweeps = []
    for kernel, sweep, launch, operands in launches:
        for i, tiles in enumerate(sweep):
            row: dict[str, Any] = {
                "n": n,
                "k": k,
                "kernel": kernel,
                "tiles": list(dataclasses.astuple(tiles)),
                "default": i == 0,
            }
            try:
                ms = _median_ms(functools.partial(launch, *operands, tiles), reps)
            except Exception as err:  # noqa: BLE001 - a tile size this GPU cannot run (shared memory)
                sweeps.append(row | {"error": f"{type(err).__name__}: {str(err)[:120]}"})
                continue
            sweeps.append(row | {"ms": ms, "tflops": flops / ms / 1e9})
    return paths, sweeps


def grouped_gemm_benchmark(tokens: int, reps: int) -> dict[str, list[dict[str, Any]]]:
    """The experts' grouped GEMMs alone, by each path and at each tile size (see the module docstring)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    num_experts, top_k = RELEASE_SHAPE["num_experts"], RELEASE_SHAPE["num_experts_per_tok"]
    hidden, width = RELEASE_SHAPE["hidden_size"], RELEASE_SHAPE["expert_intermediate_size"]
    ends, rows = routed_groups(tokens, top_k, num_experts, generator)
    result: dict[str, list[dict[str, Any]]] = {"paths": [], "tile_sweep": []}
    for gemm, (n, k) in (("gate/up", (width, hidden)), ("down", (hidden, width))):
        paths, sweeps = _time_gemm(n, k, ends, rows, tokens * top_k, reps, generator)
        result["paths"] += [{"gemm": gemm} | r for r in paths]
        result["tile_sweep"] += [{"gemm": gemm} | r for r in sweeps]
    return result


def _print_grouped_gemm(result: dict[str, list[dict[str, Any]]], tokens: int) -> None:
    print(
        f"\nExperts' grouped GEMMs, LLaDA-MoE 7B-A1B shape, {tokens} tokens x top-8 of 64, bf16, "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    )
    print("| GEMM (N x K) | path | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for r in result["paths"]:
        print(
            f"| {r['gemm']} ({r['n']} x {r['k']}) | {r['path']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | "
            f"{r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.0f} |"
        )
    print("\n| GEMM | Triton kernel | tiles BM,BN,BK,warps,stages | ms | TFLOP/s |")
    print("|---|---|---|---|---|")
    for r in result["tile_sweep"]:
        tiles = ",".join(map(str, r["tiles"])) + (" (default)" if r["default"] else "")
        figures = f"{r['ms']:.3f} | {r['tflops']:.0f}" if "ms" in r else f"{r['error']} |"
        print(f"| {r['gemm']} | {r['kernel']} | {tiles} | {figures} |")


def main(argv: list[str]) -> None:
    p = ArgumentParser(prog="benchmark.py moe", description=__doc__)
    p.add_argument(
        "--n-layers", type=int, default=8, help="layers of the release's 16 (memory: fp32 masters)"
    )
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batches", type=int_list, default=[2, 4], help="comma list, ours at each")
    p.add_argument("--reference-micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reference-steps", type=int, default=8)
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time ours with each block compiled (model.compile_blocks)",
    )
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    p.add_argument(
        "--grouped-gemm", action="store_true", help="time only the experts' grouped GEMMs (see above)"
    )
    p.add_argument("--gemm-tokens", type=int, default=8192, help="tokens routed in --grouped-gemm")
    p.add_argument("--gemm-reps", type=int, default=10, help="timed repetitions per figure of --grouped-gemm")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmark.py moe: needs a CUDA GPU")
    command = "python scripts/benchmark.py moe " + " ".join(argv)
    if args.grouped_gemm:
        gemms = grouped_gemm_benchmark(args.gemm_tokens, args.gemm_reps)
        _print_grouped_gemm(gemms, args.gemm_tokens)
        if args.out:
            write_json(
                args.out,
                {
                    "benchmark": "moe --grouped-gemm",
                    "command": command,
                    "tokens": args.gemm_tokens,
                    "shape": RELEASE_SHAPE,
                }
                | gemms,
            )
        return
    device = torch.device("cuda")
    config = LLaDAMoEConfig(
        **RELEASE_SHAPE,
        num_hidden_layers=args.n_layers,
        max_position_embeddings=args.seq_len,
        mask_token_id=RELEASE_SHAPE["vocab_size"] - 1,
        eos_token_id=RELEASE_SHAPE["vocab_size"] - 2,
    )
    model = random_moe(config, device, seed=0)
    objective = ComposerLLaDA(model, DiffusionConfig(random_length_prob=0.0), loss_impl="fused")
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-5, fused=True)
    generator = torch.Generator(device=device).manual_seed(0)

    def batches(micro_batch: int, count: int) -> list[torch.Tensor]:
        shape = (micro_batch, args.seq_len)
        return [
            torch.randint(0, config.vocab_size - 2, shape, device=device, generator=generator)
            for _ in range(count)
        ]

    flops_per_token = config.training_flops(1, args.seq_len) / args.seq_len
    check = same_batch_losses(objective, batches(1, 1)[0])
    results: list[dict[str, Any]] = []
    branches = [False]
    if hasattr(torch, "_grouped_mm") and not forced_torch27():  # and as the pinned torch runs it
        branches.append(True)
    runs = [
        ("ours", SparseMoE, mb, args.steps, torch27, compiled)
        for compiled in ([False, True] if args.compile else [False])
        for torch27 in branches
        for mb in args.micro_batches
    ]
    runs.append(
        (
            "reference (dLLM's loop over experts)",
            LoopSparseMoE,
            args.reference_micro_batch,
            args.reference_steps,
            False,
            False,
        )
    )
    for path, cls, micro_batch, steps, torch27, compiled in runs:
        _set_experts(model, cls)
        _compile_blocks(model, compiled)
        if path == "ours":
            path += (", torch-2.7 branches (Triton grouped GEMM)" if torch27 else "") + (
                ", compiled blocks" if compiled else ""
            )
        row: dict[str, Any] = {
            "path": path,
            "micro_batch": micro_batch,
            "torch27_branches": torch27 or forced_torch27(),
            "compiled": compiled,
        }
        try:
            with _branch("torch27") if torch27 else contextlib.nullcontext():
                step_s_list, peak = time_steps(
                    objective, optimizer, batches(micro_batch, steps), min(args.warmup, steps - 1)
                )
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            results.append(row | {"oom": True})
            continue
        tokens_per_s = repeats(
            [micro_batch * args.seq_len / t for t in step_s_list]
        )  # median and range of steps
        mfu = tokens_per_s["median"] * flops_per_token / H200_PEAK_FLOPS
        row |= {"tokens_per_s": tokens_per_s, "mfu_active": mfu, "step_s": repeats(step_s_list)}
        results.append(row | {"peak_gib": peak})
    reference = next((r for r in results if r["path"].startswith("reference") and "tokens_per_s" in r), None)
    print(
        f"\nLLaDA-MoE 7B-A1B shape, {args.n_layers} of 16 layers, seq {args.seq_len}, {torch.cuda.get_device_name()}"
    )
    print(f"active params {config.num_params(active=True) / 1e9:.2f}B of {config.num_params() / 1e9:.2f}B")
    print("| path | mb | tokens/s | vs reference | active-param MFU | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if r.get("oom"):
            print(f"| {r['path']} | {r['micro_batch']} | OOM | | | |")
            continue
        speedup = (
            central(r["tokens_per_s"]) / central(reference["tokens_per_s"]) if reference else float("nan")
        )
        print(
            f"| {r['path']} | {r['micro_batch']} | {fmt(r['tokens_per_s'], ',.0f')} | {speedup:.2f}x | "
            f"{100 * r['mfu_active']:.1f}% | {r['peak_gib']:.1f} |"
        )
    print(f"loss of one batch, same weights: ours {check['ours']:.5f}, reference {check['reference']:.5f}")
    if args.out:
        write_json(
            args.out,
            {
                "benchmark": "moe",
                "command": command,
                "shape": RELEASE_SHAPE | {"num_hidden_layers": args.n_layers, "seq_len": args.seq_len},
                "active_params": config.num_params(active=True),
                "total_params": config.num_params(),
                "training_flops_per_token": flops_per_token,
                "same_batch_loss": check,
                "results": results,
            },
        )
