"""Monte-Carlo likelihood speed: :func:`composer_dlm.likelihood.mc_log_likelihoods` against a transcription of
LLaDA's ``get_log_likelihood`` loop, on the same model with the same estimator.

    python scripts/benchmark.py likelihood                  # 8B-shaped bf16 model on CUDA, the issue's shapes
    python scripts/benchmark.py likelihood --shape tiny --device cpu --shapes 16/4/8/4 16/1/1/8:4 \\
        --reference-requests 1                              # a smoke test of the code path

A shape ``P/A/M/R`` is prompt length P, answer length A, ``mc_num`` M and R requests (random token ids);
``P/A/M/R:C`` gives every context C answers (R/C contexts, as a multiple-choice task such as MMLU asks four
one-token answers after each question). The
reference scores one request at a time the way LLaDA's evaluator does: ``M / 32`` forwards of 32 rows, each the
full logits of every position, the mask counts stratified from one offset per forward and each row's positions
chosen by its own ``randperm``, the loss of the masked positions divided by their mask ratio and read back to the
host after every forward. Ours scores all R requests in one call (rows of many requests packed into forwards of
up to ``--batch-tokens`` tokens, the last block computed over the answer positions only, only the masked answer
positions projected, the fused inference forward on CUDA). Both stratify the counts within batches of 32 rows;
the mean estimate over the requests is printed for each, and for one-token answers (where the estimate is
exact) the largest difference per request. Time is per request: one whole call's wall time over R, after a
warm-up call of each, timed ``--repeats`` times (the reference's speed depends on the host's, and varied
1.6-fold between calls): the JSON keeps every repeat with its median and range, and the speed-up divides the
medians. ``--reference-requests`` times the reference on fewer requests (it does each alone, so
its time per request does not depend on R).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from composer_dlm.benchmarks import repeats, write_json
from composer_dlm.benchmarks.sampler import SHAPES, setup, timed
from composer_dlm.cli import ArgumentParser
from composer_dlm.generate import guide
from composer_dlm.likelihood import mc_log_likelihoods

DEFAULT_SHAPES = ["512/32/128/4", "128/8/128/8", "512/1/1/256", "512/1/1/256:4"]
REFERENCE_BATCH = 32  # rows per forward in LLaDA's evaluator


# --- the baseline -------------------------------------------------------------------------------------------------
def _reference_noise(
    seq_NL: torch.Tensor, prompt_length: int, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA's forward process for likelihood: answer positions only, counts spread from one random offset."""
    rows, length = seq_NL.shape
    answer_length = length - prompt_length
    device = seq_NL.device
    offset = torch.randint(1, answer_length + 1, (), device=device)
    counts = torch.round(
        torch.linspace(
            float(offset), float(offset) + (rows - 1) * (answer_length / rows), rows, device=device
        )
    ).long()
    counts = (counts - 1) % answer_length + 1
    is_mask = torch.arange(answer_length, device=device).repeat(rows, 1) < counts[:, None]
    for i in range(rows):  # one permutation per row, drawn on the host
        is_mask[i] = is_mask[i][torch.randperm(answer_length)]
    is_mask = torch.cat([torch.zeros(rows, prompt_length, dtype=torch.bool, device=device), is_mask], dim=1)
    noisy = torch.where(is_mask, mask_id, seq_NL)
    return noisy, (counts / answer_length)[:, None].repeat(1, length)


@torch.no_grad()
def reference_log_likelihood(
    model: nn.Module,
    prompt: torch.Tensor,
    answer: torch.Tensor,
    *,
    mc_num: int,
    mask_id: int,
    cfg_scale: float = 0.0,
    batch_size: int = REFERENCE_BATCH,
) -> float:
    """LLaDA's ``get_log_likelihood`` loop, the work included (full logits, a host read per forward)."""
    seq = torch.cat([prompt, answer])[None].repeat(batch_size, 1)
    prompt_length = prompt.numel()
    losses = []
    for _ in range(max(mc_num // batch_size, 1)):
        noisy, p_mask = _reference_noise(seq, prompt_length, mask_id)
        masked = noisy == mask_id
        x = noisy
        if cfg_scale > 0:
            uncond = noisy.clone()
            uncond[:, :prompt_length] = mask_id
            x = torch.cat([noisy, uncond])
        logits = model(x)
        if cfg_scale > 0:
            cond, uncond_logits = logits.chunk(2)
            logits = guide(cond, uncond_logits, cfg_scale)
        loss = F.cross_entropy(logits[masked], seq[masked], reduction="none") / p_mask[masked]
        losses.append((loss.sum() / batch_size).item())
    return -sum(losses) / len(losses)


def _reference_all(
    model: nn.Module, requests: list[tuple[torch.Tensor, torch.Tensor]], **kw: Any
) -> list[float]:
    """The reference on each request in turn, as LLaDA's evaluator loops over them."""
    return [reference_log_likelihood(model, prompt, answer, **kw) for prompt, answer in requests]


# --- main ---------------------------------------------------------------------------------------------------------
def _shape(text: str) -> tuple[int, int, int, int, int]:
    """``P/A/M/R[:C]`` as (P, A, M, R, C), C = 1 when not given."""
    shape, _, choices = text.partition(":")
    try:
        parts = [int(v) for v in shape.split("/")] + [int(choices or 1)]
    except ValueError:
        parts = []
    if len(parts) != 5 or min(parts) < 1 or parts[3] % parts[4]:
        raise argparse.ArgumentTypeError(
            f"expected PROMPT/ANSWER/MC_NUM/REQUESTS[:CHOICES] with CHOICES dividing REQUESTS, got {text!r}"
        )
    return parts[0], parts[1], parts[2], parts[3], parts[4]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="benchmark.py likelihood", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--shapes", type=_shape, nargs="+", default=[_shape(s) for s in DEFAULT_SHAPES])
    p.add_argument("--reference-requests", type=int, default=None, help="time the reference on this many")
    p.add_argument("--batch-tokens", type=int, default=32768, help="our packing budget per forward")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each (median and range reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the figures as JSON to PATH.json")
    return p.parse_args(argv)


def main(argv: list[str]) -> list[dict[str, Any]]:
    args = parse_args(argv)
    began = time.perf_counter()
    device, dtype_name, mask_id, model, _ = setup(args)
    print("| prompt | answer | mc_num | requests (answers per context) | LLaDA loop ms/request | ours ms/request | "
          "speed-up | mean estimate (LLaDA loop / ours) |\n|---|---|---|---|---|---|---|---|", flush=True)  # fmt: skip
    vocab_ids = min(SHAPES[args.shape]["vocab_size"], mask_id) - 2
    rows = []
    for prompt_length, answer_length, mc_num, num_requests, choices in args.shapes:
        g = torch.Generator().manual_seed(args.seed + prompt_length * 1000 + answer_length)
        contexts = torch.randint(0, vocab_ids, (num_requests // choices, prompt_length), generator=g)
        prompts = contexts.repeat_interleave(choices, dim=0).to(device)
        answers = torch.randint(0, vocab_ids, (num_requests, answer_length), generator=g).to(device)
        requests = list(zip(prompts, answers, strict=True))
        batch = min(REFERENCE_BATCH, mc_num)
        ref_n = min(args.reference_requests or num_requests, num_requests)

        reference = functools.partial(
            _reference_all, model, requests[:ref_n], mc_num=mc_num, mask_id=mask_id, batch_size=batch
        )
        ours = functools.partial(
            mc_log_likelihoods, model, mask_token_id=mask_id, num_samples=mc_num, batch_size=batch,
            batch_tokens=args.batch_tokens,
        )  # fmt: skip
        _reference_all(model, requests[:1], mc_num=mc_num, mask_id=mask_id, batch_size=batch)  # warm-up
        ours(requests[:2])  # warm-up: kernels, cuBLAS handles, allocator
        ref_times, our_times = [], []
        for _ in range(args.repeats):
            ref_scores, ref_s = timed(reference, device)
            our_scores, our_s = timed(functools.partial(ours, requests), device)
            ref_times.append(1000 * ref_s / ref_n)
            our_times.append(1000 * our_s / num_requests)
        ref_ms, our_ms = repeats(ref_times), repeats(our_times)
        ref_mean, our_mean = sum(ref_scores) / ref_n, sum(our_scores[:ref_n]) / ref_n
        note, worst = "", None
        if answer_length == 1:  # exact: the two must agree request by request
            worst = max(abs(r - o) for r, o in zip(ref_scores, our_scores, strict=False))
            note = f"; max difference {worst:.3g}"
        ref_text = f"{ref_ms['median']:.1f} ({ref_ms['min']:.1f}-{ref_ms['max']:.1f})"
        our_text = f"{our_ms['median']:.1f} ({our_ms['min']:.1f}-{our_ms['max']:.1f})"
        print(f"| {prompt_length} | {answer_length} | {mc_num} | {num_requests} ({choices}) | {ref_text} | "
              f"{our_text} | {ref_ms['median'] / our_ms['median']:.2f}x | {ref_mean:.3f} / {our_mean:.3f}{note} |", flush=True)  # fmt: skip
        rows.append({"prompt": prompt_length, "answer": answer_length, "mc_num": mc_num, "requests": num_requests,
                     "answers_per_context": choices, "reference_ms": ref_ms, "ours_ms": our_ms,
                     "mean_estimate": {"reference": ref_mean, "ours": our_mean},
                     "max_difference": worst})  # fmt: skip
    print(f"total {time.perf_counter() - began:.0f}s", flush=True)
    if args.out:
        command = "python scripts/benchmark.py likelihood " + " ".join(argv)
        meta = {"benchmark": "likelihood", "command": command, "shape": args.shape, "dtype": dtype_name}
        write_json(Path(args.out).with_suffix(".json"), meta | {"rows": rows})
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
