"""Loader benchmark: sequences per second read and collated, against what one H200 consumes.

    python scripts/benchmark.py loader [--mode pretrain sft] [--seq-len 4096] [--num-workers 0 2] ...

Without --data it writes synthetic shards (random token ids of the embedded tokenizer's vocabulary;
SFT examples of random prompt and answer lengths) to a temporary folder and reads them with
build_dataloader, shuffled as in training. The target: the 1.65B LLaDA shape (d_model 2048, 22 layers, MLP 5632,
vocabulary 126464) at sequence 4096 on one H200 at 50% MFU of 989 TFLOP/s, FLOPs by the project's one
formula (``LLaDAConfig.training_flops``, attention included), consumes 11.4 sequences/s (about 47k
tokens/s); the loader should beat that by a wide margin.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from composer_dlm.benchmarks import H200_PEAK_FLOPS, write_json
from composer_dlm.cli import ArgumentParser

TARGET_MODEL = {"d_model": 2048, "n_layers": 22, "n_heads": 32, "mlp_hidden_size": 5632, "vocab_size": 126464}
TARGET_SEQ_LEN = 4096
TARGET_MFU = 0.5


def target_sequences_per_second(seq_len: int = TARGET_SEQ_LEN) -> float:
    """Sequences/s one H200 trains the 1.65B shape at TARGET_MFU (``LLaDAConfig.training_flops`` per sequence)."""
    from composer_dlm.models.llada import LLaDAConfig

    config = LLaDAConfig(**TARGET_MODEL, max_sequence_length=seq_len)  # type: ignore[arg-type]
    return TARGET_MFU * H200_PEAK_FLOPS / config.training_flops(1, seq_len)


def write_synthetic(
    root: Path, *, mode: str, seq_len: int, num_samples: int, tokenizer: Any, seed: int = 0
) -> Path:
    """Random-token shards for `mode` under root/<mode>/train (64 MB each, hashed in index.json as the converter
    does), with a manifest for `tokenizer`."""
    from streaming import MDSWriter

    from composer_dlm.data.convert import COLUMNS, TRAIN
    from composer_dlm.data.manifest import build_manifest, tokenizer_info, write_manifest
    from composer_dlm.data.verify import HASH

    rng = np.random.default_rng(seed)
    folder = root / mode / TRAIN
    vocab = len(tokenizer)
    total = 0
    with MDSWriter(out=str(folder), columns=COLUMNS[mode], hashes=[HASH], size_limit="64mb") as writer:
        for _ in range(num_samples):
            if mode == "pretrain":
                writer.write({"tokens": rng.integers(0, vocab, seq_len, dtype=np.uint32)})
                total += seq_len
            else:
                prompt = int(rng.integers(1, max(2, seq_len // 4)))  # prompts up to a quarter of seq_len
                length = int(rng.integers(prompt + 1, seq_len + 1))
                writer.write(
                    {"tokens": rng.integers(0, vocab, length, dtype=np.uint32), "prompt_length": prompt}
                )
                total += length
    manifest = build_manifest(
        mode=mode,
        split=TRAIN,
        seq_len=seq_len,
        columns=COLUMNS[mode],
        compression=None,
        tokenizer=tokenizer_info(tokenizer, "embedded"),
        counts={"samples": num_samples, "tokens": total},
        inputs=["synthetic"],
        options={"seed": seed},
        hashes=[HASH],
    )
    write_manifest(folder, manifest)
    return folder.parent


def measure(loader: Any, *, warmup: int, batches: int) -> dict[str, float]:
    """Time `batches` batches after `warmup` ones (worker start-up excluded); loops over epochs."""

    def forever():
        while True:
            yield from loader

    it = forever()
    for _ in range(warmup):
        next(it)
    num_seqs = num_tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        num_seqs += batch["input_ids"].shape[0]
        num_tokens += batch["input_ids"].numel()
    seconds = time.perf_counter() - start
    del it
    return {"seqs_per_s": num_seqs / seconds, "tokens_per_s": num_tokens / seconds, "seconds": seconds}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from composer_dlm.data import LoaderConfig, build_dataloader, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.mode:
            if args.data:
                local, split = args.data, args.split
            else:
                local = str(
                    write_synthetic(
                        Path(tmp),
                        mode=mode,
                        seq_len=args.seq_len,
                        num_samples=args.num_samples,
                        tokenizer=tokenizer,
                    )
                )
                split = "train"
            for workers in args.num_workers:
                cfg = LoaderConfig(local=local, split=split, shuffle=True, num_workers=workers)
                loader = build_dataloader(
                    cfg,
                    tokenizer=tokenizer,
                    mode=mode,
                    max_seq_len=args.seq_len,
                    device_batch_size=args.batch_size,
                )
                figures = measure(loader, warmup=args.warmup, batches=args.batches)
                results.append({"mode": mode, "num_workers": workers, **figures})
                del loader
                gc.collect()
    return results


def main(argv: list[str]) -> list[dict[str, Any]]:
    p = ArgumentParser(prog="benchmark.py loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", nargs="+", choices=["pretrain", "sft"], default=["pretrain", "sft"])
    p.add_argument("--seq-len", type=int, default=TARGET_SEQ_LEN)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--num-samples", type=int, default=1024, help="synthetic samples per mode")
    p.add_argument("--batches", type=int, default=100, help="batches timed")
    p.add_argument("--warmup", type=int, default=5, help="batches read before timing")
    p.add_argument("--data", help="existing shard folder to read instead of synthetic data")
    p.add_argument("--split", default="train", help="split of --data")
    p.add_argument("--tokenizer", default="embedded", help="tokenizer of --data (default: embedded)")
    p.add_argument("--out", help="write the raw figures and the environment as JSON here")
    args = p.parse_args(argv)
    results = run(args)
    if args.out:
        command = "python scripts/benchmark.py loader " + " ".join(argv)
        write_json(args.out, {"benchmark": "loader", "command": command, "results": results})
    target = target_sequences_per_second(args.seq_len)
    print(f"loader: seq_len {args.seq_len}, batch {args.batch_size}, {args.batches} batches timed")
    print(
        f"target: {target:.1f} seqs/s ({target * args.seq_len / 1e3:.0f}k tokens/s) = 1.65B params on one H200"
    )
    print(f"{'mode':10}{'workers':>8}{'seqs/s':>12}{'tokens/s':>14}{'x target':>10}")
    for r in results:
        print(
            f"{r['mode']:10}{r['num_workers']:>8}{r['seqs_per_s']:>12.1f}{r['tokens_per_s']:>14,.0f}"
            f"{r['seqs_per_s'] / target:>10.1f}"
        )
    return results
