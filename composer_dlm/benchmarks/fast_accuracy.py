"""Fast mode's accuracy against exact mode on the embedded corpus's facts, and its tokens committed per forward.

    python scripts/benchmark.py fast_accuracy runs/quickstart/hf/final --out composer_dlm/benchmarks/results/fast_accuracy

Prompts are the corpus's own fact templates cut before the answer (``The capital of France is`` -> ``Paris``;
``Three plus four is`` -> ``seven``; ``3 + 4 =`` -> ``7``, from :mod:`composer_dlm.data.synthetic`); an answer
counts as right when the generated text starts with the expected word(s). Every mode decodes the same prompts,
batched with left padding; a forward is one model call per step (a step under guidance still counts once).
Tokens committed per forward = generated tokens / forwards, the parallelism that threshold decoding buys; its
speed on a large model is that count times the cached step time measured there (``benchmark.py sampler``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from composer_dlm.benchmarks import write_json
from composer_dlm.cli import ArgumentParser, fail
from composer_dlm.data import load_tokenizer, mask_token_id
from composer_dlm.data.synthetic import CAPITALS, NUMBER_WORDS
from composer_dlm.generate import FastMode, generate, left_pad
from composer_dlm.models import LLaDAModel

MODES: dict[str, FastMode | None] = {
    "exact": None,
    "dual cache": FastMode(cache="dual"),
    "prefix cache": FastMode(cache="prefix"),
    "dual cache + threshold 0.9": FastMode(cache="dual", threshold=0.9),
    "threshold 0.9": FastMode(threshold=0.9),
    "dual cache + factor 1.0": FastMode(cache="dual", factor=1.0),
}


def fact_prompts() -> list[tuple[str, str]]:
    """(prompt, expected answer) for every capital and every sum of two numbers below 6, in words and digits."""
    items = [(f"The capital of {country} is", city) for country, city in CAPITALS]
    for a in range(6):
        for b in range(6):
            items.append((f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is".capitalize(), NUMBER_WORDS[a + b]))
            items.append((f"{a} + {b} =", str(a + b)))
    return items


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="benchmark.py fast_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a Hugging Face folder of the quickstart's model (runs/quickstart/hf/final)")
    p.add_argument("--tokenizer", default="embedded")
    p.add_argument("--gen-length", type=int, default=8)
    p.add_argument("--block-length", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", help="write PATH.json")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    model = LLaDAModel.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.tokenizer)
    mask_id = mask_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.eos_token_id
    if pad is None:
        fail(f"{args.model}: config.json has no eos_token_id and the tokenizer no pad token; set either")
    items = fact_prompts()
    results = []
    for label, fast in MODES.items():
        began, forwards, right = time.perf_counter(), 0, 0
        for start in range(0, len(items), args.batch_size):
            part = items[start : start + args.batch_size]
            rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in part]
            ids, attn = left_pad(rows, pad_id=pad)
            calls: list[int] = []
            out = generate(
                model, ids, attention_mask=attn, steps=args.steps, gen_length=args.gen_length,
                block_length=args.block_length, mask_token_id=mask_id, fast=fast,
                on_step=lambda i, x: calls.append(i),  # noqa: B023 (used within this call)
            )  # fmt: skip
            forwards += len(calls)
            for (_, answer), tokens in zip(part, out[:, ids.shape[1] :].tolist(), strict=True):
                right += tokenizer.decode(tokens, skip_special_tokens=True).strip().startswith(answer)
        batches = -(-len(items) // args.batch_size)
        row = {
            "mode": label,
            "accuracy": right / len(items),
            "correct": right,
            "prompts": len(items),
            "forwards": forwards,
            "tokens_per_forward": batches * args.gen_length / forwards,
            "seconds": time.perf_counter() - began,
        }
        results.append(row)
        print(f"{label:28s} accuracy {row['accuracy']:.3f} ({right}/{len(items)})  "
              f"tokens/forward {row['tokens_per_forward']:.2f}", flush=True)  # fmt: skip
    if args.out:
        write_json(
            Path(args.out).with_suffix(".json"),
            {"benchmark": "fast_accuracy", "options": vars(args), "results": results},
        )


if __name__ == "__main__":
    main(sys.argv[1:])
