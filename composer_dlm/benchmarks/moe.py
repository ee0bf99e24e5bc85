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
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from composer_dlm.benchmarks import H200_PEAK_FLOPS, int_list, write_json
from composer_dlm.benchmarks.sampler import random_model
from composer_dlm.cli import ArgumentParser
from composer_dlm.diffusion import DiffusionConfig
from composer_dlm.models.composer_llada import ComposerLLaDA
from composer_dlm.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModel, SparseMoE

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


def time_steps(
    objective: ComposerLLaDA,
    optimizer: torch.optim.Optimizer,
    batches: list[torch.Tensor],
    warmup: int,
) -> tuple[float, float]:
    """(seconds per step after ``warmup`` steps, peak GiB) over ``batches``, one step each."""
    device = batches[0].device
    for i, ids in enumerate(batches):
        if i == warmup:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        objective.set_noise_step(i)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = objective({"input_ids": ids}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return elapsed / (len(batches) - warmup), torch.cuda.max_memory_allocated(device) / 2**30


def same_batch_losses(objective: ComposerLLaDA, ids: torch.Tensor) -> dict[str, float]:
    """The loss of one batch with the same weights and noise by both expert paths (no step taken)."""
    losses = {}
    for name, cls in (("ours", SparseMoE), ("reference", LoopSparseMoE)):
        _set_experts(objective.model, cls)  # type: ignore[arg-type]
        objective.set_noise_step(10_000)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            losses[name] = float(objective({"input_ids": ids}).loss)
    return losses


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
    p.add_argument("--reference-steps", type=int, default=4)
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmark.py moe: needs a CUDA GPU")
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
    runs = [("ours", SparseMoE, mb, args.steps) for mb in args.micro_batches]
    runs.append(
        (
            "reference (dLLM's loop over experts)",
            LoopSparseMoE,
            args.reference_micro_batch,
            args.reference_steps,
        )
    )
    for path, cls, micro_batch, steps in runs:
        _set_experts(model, cls)
        row: dict[str, Any] = {"path": path, "micro_batch": micro_batch}
        try:
            step_s, peak = time_steps(
                objective, optimizer, batches(micro_batch, steps), min(args.warmup, steps - 1)
            )
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            results.append(row | {"oom": True})
            continue
        tps = micro_batch * args.seq_len / step_s
        row |= {"tokens_per_s": tps, "mfu_active": tps * flops_per_token / H200_PEAK_FLOPS, "step_s": step_s}
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
        speedup = r["tokens_per_s"] / reference["tokens_per_s"] if reference else float("nan")
        print(
            f"| {r['path']} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {speedup:.2f}x | "
            f"{100 * r['mfu_active']:.1f}% | {r['peak_gib']:.1f} |"
        )
    print(f"loss of one batch, same weights: ours {check['ours']:.5f}, reference {check['reference']:.5f}")
    if args.out:
        write_json(
            args.out,
            {
                "benchmark": "moe",
                "command": "python scripts/benchmark.py moe " + " ".join(argv),
                "shape": RELEASE_SHAPE | {"num_hidden_layers": args.n_layers, "seq_len": args.seq_len},
                "active_params": config.num_params(active=True),
                "total_params": config.num_params(),
                "training_flops_per_token": flops_per_token,
                "same_batch_loss": check,
                "results": results,
            },
        )
