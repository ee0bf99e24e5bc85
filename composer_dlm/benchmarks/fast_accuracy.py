"""Fast mode's accuracy against exact mode on the embedded corpus's facts, and its tokens committed per forward.

    python scripts/benchmark.py fast_accuracy runs/quickstart/hf/final --out composer_dlm/benchmarks/results/fast_accuracy

Prompts are every fact and every sum or difference the corpus's templates can state (:mod:`composer_dlm.data.synthetic`),
cut before the answer (``The capital of France is`` -> ``Paris``; ``The dog`` -> ``barks``; ``Three plus four is``
-> ``seven``; ``9 - 4 =`` -> ``5``): 426 prompts. An answer counts as right when the generated text starts with the
expected word(s) followed by a non-word character or the end (``1`` is not ``10``, ``six`` not ``sixteen``).
Every mode decodes the same prompts, batched with left padding; a forward is one model call per step (a step under
guidance still counts once). Besides accuracy, each mode reports its agreement with exact mode: the prompts whose
generated tokens (all ``gen_length``) are exact mode's (same tokens), those whose leading words, as many as the
expected answer has, are exact mode's (same answer), and how many it gets right that exact mode gets wrong (gained)
and the reverse (lost): the accuracy difference is (gained - lost) / prompts, at most the token disagreement.
Tokens committed per forward = generated tokens / forwards, the parallelism that threshold decoding buys; its speed
on a large model is that count times the cached step time measured there (``benchmark.py sampler``).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from composer_dlm.benchmarks import write_json
from composer_dlm.cli import ArgumentParser, fail
from composer_dlm.data import load_tokenizer, mask_token_id
from composer_dlm.data.synthetic import CAPITALS, COLOURS, JOBS, NUMBER_WORDS, SOUNDS
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
    """(prompt, expected answer) for every fact of the corpus (capitals, colours, animal sounds, jobs) and every
    sum and difference of two numbers up to 10, in words and in digits, in the corpus's own words."""
    items = [(f"The capital of {country} is", city) for country, city in CAPITALS]
    items += [(f"{thing} is".capitalize(), colour) for thing, colour in COLOURS]
    items += [(f"The {animal}", sound) for animal, sound in SOUNDS]
    items += [(f"A {job}", work) for job, work in JOBS]
    for a in range(11):
        for b in range(11):
            items.append((f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is".capitalize(), NUMBER_WORDS[a + b]))
            items.append((f"{a} + {b} =", str(a + b)))
    for big in range(11):
        for small in range(big + 1):
            words = f"{NUMBER_WORDS[big]} minus {NUMBER_WORDS[small]} is".capitalize()
            items.append((words, NUMBER_WORDS[big - small]))
            items.append((f"{big} - {small} =", str(big - small)))
    return items


def is_right(text: str, answer: str) -> bool:
    """Whether the generated ``text`` starts (after spaces) with ``answer`` as whole words."""
    return re.match(rf"\s*{re.escape(answer)}(?!\w)", text) is not None


def leading_words(text: str, answer: str) -> list[str]:
    """The first words of ``text``, as many as ``answer`` has: the part of an answer that is graded."""
    return re.findall(r"\w+", text)[: len(answer.split())]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="benchmark.py fast_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a Hugging Face folder of the quickstart's model (runs/quickstart/hf/final)")
    p.add_argument("--tokenizer", default="embedded")
    p.add_argument("--gen-length", type=int, default=8)
    p.add_argument("--block-length", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--trained-with", help="the command that trained the model, recorded in the JSON")
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
    results: list[dict[str, object]] = []
    # Exact mode (the first mode): its tokens and verdicts, which the other modes are compared with.
    exact: tuple[list[list[int]], list[list[str]], list[bool]] | None = None
    for label, fast in MODES.items():
        began, forwards = time.perf_counter(), 0
        answers: list[list[int]] = []
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
            answers += out[:, ids.shape[1] :].tolist()
        seconds = time.perf_counter() - began
        texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in answers]
        right = [is_right(text, answer) for text, (_, answer) in zip(texts, items, strict=True)]
        words = [leading_words(text, answer) for text, (_, answer) in zip(texts, items, strict=True)]
        exact = exact or (answers, words, right)
        pairs = list(zip(answers, exact[0], words, exact[1], strict=True))
        batches = -(-len(items) // args.batch_size)
        same_tokens = sum(a == e for a, e, _, _ in pairs)
        same_answer = sum(w == e for _, _, w, e in pairs)
        row = {
            "mode": label,
            "accuracy": sum(right) / len(items),
            "correct": sum(right),
            "prompts": len(items),
            "same_tokens": same_tokens,
            "token_agreement": same_tokens / len(items),
            "same_answer": same_answer,
            "answer_agreement": same_answer / len(items),
            "gained": sum(r and not e for r, e in zip(right, exact[2], strict=True)),
            "lost": sum(e and not r for r, e in zip(right, exact[2], strict=True)),
            "forwards": forwards,
            "tokens_per_forward": batches * args.gen_length / forwards,
            "seconds": seconds,
        }
        results.append(row)
        print(f"{label:28s} accuracy {row['accuracy']:.3f} ({row['correct']}/{len(items)})  "
              f"same answer {same_answer}  same tokens {same_tokens}  gained {row['gained']} lost {row['lost']}  "
              f"tokens/forward {row['tokens_per_forward']:.2f}", flush=True)  # fmt: skip
    if args.out:
        write_json(
            Path(args.out).with_suffix(".json"),
            {
                "benchmark": "fast_accuracy",
                "command": "python scripts/benchmark.py fast_accuracy " + shlex.join(argv),
                "options": vars(args),
                "results": results,
            },
        )


if __name__ == "__main__":
    main(sys.argv[1:])
