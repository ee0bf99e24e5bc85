"""Start-up benchmark: host peak RSS per rank and seconds until training starts, fine-tuning a release-style folder.

    python scripts/benchmark.py startup write --out /tmp/llada8b            # random bf16 LLaDA-8B-shaped folder
    python -m composer.cli.launcher -n 8 -m composer_dlm.benchmarks.startup run /tmp/llada8b --out startup.json

``write`` lays out a folder as LLaDA's release does (config.json stating every key, bf16 safetensors shards with
an index, tokenizer, generation config) with random weights: LLaDA-8B's shape (``--shape 8b``, 8.0B parameters,
16 GB) or a tiny one for a CPU trial. Its mask and EOS ids are the embedded tokenizer's, so the run needs no
download; the vocabulary rows stay 126464.

``run`` (every rank, under Composer's launcher) fine-tunes the folder for one batch through ``build_trainer``
(FSDP FULL_SHARD on GPUs, amp_bf16, sequence 128, no checkpoints) and records, per rank, the peak resident set
size (``ru_maxrss``) and the seconds from process start to the first batch (model build, weight load, FSDP
sharding). Rank 0 writes them with the environment to ``--out``.

Before and after issue 14 on one machine, with extra overrides after the folder:

    ... run /tmp/llada8b --out before.json fsdp.sync_module_states=false model.master_weights=bf16
    ... run /tmp/llada8b --out every_rank_fp32.json fsdp.sync_module_states=false
    ... run /tmp/llada8b --out after.json

The first is what the trainer did before: every rank reads the whole folder and keeps its bf16 dtype. The second
has fp32 masters read on every rank; the third, the default, reads on local rank 0 only (the others start on the
meta device and receive the weights from FSDP's broadcast).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from composer_dlm.benchmarks import write_json
from composer_dlm.models import LLaDAConfig

ROOT = Path(__file__).resolve().parents[2]
SHAPES: dict[str, dict[str, Any]] = {
    "8b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, vocab_size=126464,
               rope_theta=500000.0, max_sequence_length=4096),
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, vocab_size=126464, max_sequence_length=256),
}  # fmt: skip


def process_age_s() -> float:
    """Seconds since this process started (Linux: its start time in /proc, in clock ticks since boot)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class StartupProbe(Callback):
    """Records, on each rank, the process's age and peak RSS when the first batch starts and when it ends."""

    def __init__(self) -> None:
        self.record: dict[str, float] = {}

    def batch_start(self, state: State, logger: Logger) -> None:
        if not self.record:
            self.record = {"to_first_batch_s": process_age_s(), "peak_rss_gib_at_start": peak_rss_gib()}

    def batch_end(self, state: State, logger: Logger) -> None:
        self.record.setdefault("first_batch_end_s", process_age_s())
        self.record.setdefault("peak_rss_gib_after_batch", peak_rss_gib())


def write_random_folder(shape: dict[str, Any], out: Path) -> None:
    """A release-style folder (bf16 safetensors, every config key, the embedded tokenizer) of a random model with
    the fields ``shape`` and the embedded tokenizer's mask and EOS ids, drawn as ``LLaDAModel.init_std`` says
    (norm weights 1), on the GPU when there is one (8B in seconds, not minutes)."""
    from composer_dlm.benchmarks.sampler import random_model
    from composer_dlm.data import load_tokenizer, mask_token_id

    tokenizer = load_tokenizer("embedded")
    ids = {"mask_token_id": mask_token_id(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    config = LLaDAConfig.from_dict(shape | ids)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    random_model(config, device, torch.bfloat16, seed=0).save_pretrained(out, tokenizer=tokenizer)
    print(f"wrote {out} ({config.num_params() / 1e9:.2f}B parameters, bf16)")


def run(folder: Path, out: Path, seq_len: int, extra: list[str]) -> None:
    from composer_dlm.builders import build_trainer
    from composer_dlm.config import load_config

    on_gpu = torch.cuda.is_available()
    overrides = {
        "run_name": "startup",
        "base_path": tempfile.mkdtemp(prefix="startup-"),
        "model.config": "null",
        "model.pretrained": str(folder),
        "tokenizer.name": "embedded",
        "max_seq_len": str(seq_len),
        "global_train_batch_size": str(int(os.environ.get("WORLD_SIZE", "1"))),
        "device_train_microbatch_size": "1",
        "max_duration": "1ba",
        "precision": "amp_bf16" if on_gpu else "fp32",
        "eval_loader": "null",
        "callbacks.samples": "null",
        "callbacks.hf_export": "null",
        "checkpoint.save": "false",
        "train_loader.num_workers": "0",
    }
    if on_gpu:
        overrides["fsdp"] = "{sharding_strategy: FULL_SHARD}"
    args = [f"{k}={v}" for k, v in overrides.items()] + extra
    probe = StartupProbe()
    trainer = build_trainer(load_config(ROOT / "yamls" / "quickstart.yaml", args), extra_callbacks=[probe])
    trainer.fit()
    records = dist.all_gather_object(probe.record)
    if dist.get_global_rank() == 0:
        payload = {
            "benchmark": "startup",
            "folder": str(folder),
            "world_size": dist.get_world_size(),
            "overrides": args,
            "ranks": records,
            "max_peak_rss_gib_at_start": max(r["peak_rss_gib_at_start"] for r in records),
            "sum_peak_rss_gib_at_start": sum(r["peak_rss_gib_at_start"] for r in records),
            "max_to_first_batch_s": max(r["to_first_batch_s"] for r in records),
        }
        write_json(out, payload)
        print(json.dumps(payload, indent=1))
    trainer.close()
    if dist.get_global_rank() == 0:
        shutil.rmtree(overrides["base_path"], ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="benchmark.py startup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write a random bf16 release-style folder")
    w.add_argument("--out", required=True, type=Path)
    w.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    r = sub.add_parser("run", help="one fine-tuning batch from FOLDER on every rank; records RSS and time")
    r.add_argument("folder", type=Path)
    r.add_argument("--out", type=Path, default=Path("startup.json"))
    r.add_argument("--seq-len", type=int, default=128)
    r.add_argument("overrides", nargs="*", help="extra dotted.key=value overrides of the run")
    args, rest = p.parse_known_args(argv)  # overrides may also follow --out
    if args.command == "write" or any("=" not in r for r in rest):
        args = p.parse_args(argv)  # reports anything unknown
    if args.command == "write":
        write_random_folder(SHAPES[args.shape], args.out)
    else:
        run(args.folder, args.out, args.seq_len, args.overrides + rest)


if __name__ == "__main__":
    main()
