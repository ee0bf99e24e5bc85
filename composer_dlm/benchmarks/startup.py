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

``data`` measures what a corpus costs each start: seconds to build the training loader (manifest and shard checks,
StreamingDataset set-up) over synthetic pretraining corpora of each ``--sizes-gib`` (64 MB shards with xxh3
hashes, as the converter writes), for a first start (``verify: quick``, no stamp yet: every shard hashed), a
second start (the stamp: no shard read), ``verify: full`` and ``verify: off`` (the median of ``--repeats``):

    python scripts/benchmark.py startup data --sizes-gib 0.25 1 4 --out startup_data.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
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


def loader_build_s(root: Path, verify: str, seq_len: int, tokenizer: Any) -> float:
    """Seconds to build the pretraining loader over ``root``'s train split with ``train_loader.verify=verify``."""
    import gc
    import time

    from composer_dlm.data import LoaderConfig, build_dataloader

    cfg = LoaderConfig(local=str(root), split="train", num_workers=0, verify=verify)
    start = time.perf_counter()
    loader = build_dataloader(
        cfg, tokenizer=tokenizer, mode="pretrain", max_seq_len=seq_len, device_batch_size=8
    )
    seconds = time.perf_counter() - start
    del loader
    gc.collect()  # frees the dataset's shared memory before the next build over the same folder
    return seconds


def data_startup(
    sizes_gib: list[float], seq_len: int, repeats: int, out: Path | None
) -> list[dict[str, Any]]:
    from composer_dlm.benchmarks.loader import write_synthetic
    from composer_dlm.data import load_tokenizer
    from composer_dlm.data.verify import STAMP_NAME

    tokenizer = load_tokenizer("embedded")
    rows = []
    for size in sizes_gib:
        with tempfile.TemporaryDirectory(prefix="startup-data-") as tmp:
            samples = int(size * 2**30) // (4 * seq_len)  # uint32 tokens
            root = write_synthetic(
                Path(tmp), mode="pretrain", seq_len=seq_len, num_samples=samples, tokenizer=tokenizer
            )
            shards = list((root / "train").glob("shard.*.mds"))
            row: dict[str, Any] = {
                "corpus_gib": sum(p.stat().st_size for p in shards) / 2**30,
                "shards": len(shards),
                "samples": samples,
            }
            stamp = root / "train" / STAMP_NAME
            runs: dict[str, list[float]] = {}
            for _ in range(repeats):  # the machine may be shared: the median of a few
                stamp.unlink(missing_ok=True)
                for label, verify in (("first_start_quick", "quick"), ("second_start_quick", "quick"),
                                      ("every_start_full", "full"), ("every_start_off", "off")):  # fmt: skip
                    runs.setdefault(label, []).append(loader_build_s(root, verify, seq_len, tokenizer))
            row |= {f"{label}_s": statistics.median(times) for label, times in runs.items()}
            row["runs_s"] = runs
        rows.append(row)
        print(json.dumps(row))
    if out is not None:
        sizes = " ".join(map(str, sizes_gib))
        command = f"python scripts/benchmark.py startup data --repeats {repeats} --sizes-gib {sizes}"
        write_json(
            out, {"benchmark": "startup data", "command": command, "seq_len": seq_len, "results": rows}
        )
    print(f"{'corpus GiB':>10}{'shards':>8}{'1st start s':>13}{'2nd start s':>13}{'full s':>9}{'off s':>8}")
    for r in rows:
        print(
            f"{r['corpus_gib']:>10.2f}{r['shards']:>8}{r['first_start_quick_s']:>13.2f}"
            f"{r['second_start_quick_s']:>13.2f}{r['every_start_full_s']:>9.2f}{r['every_start_off_s']:>8.2f}"
        )
    return rows


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
    d = sub.add_parser("data", help="seconds to build the loader against corpus size, per verify setting")
    d.add_argument("--sizes-gib", type=float, nargs="+", default=[0.25, 1.0, 4.0])
    d.add_argument("--seq-len", type=int, default=4096)
    d.add_argument("--repeats", type=int, default=3, help="builds per setting; the median is reported")
    d.add_argument("--out", type=Path)
    args, rest = p.parse_known_args(argv)  # overrides may also follow --out
    if args.command in ("write", "data") or any("=" not in r for r in rest):
        args = p.parse_args(argv)  # reports anything unknown
    if args.command == "write":
        write_random_folder(SHAPES[args.shape], args.out)
    elif args.command == "data":
        data_startup(args.sizes_gib, args.seq_len, args.repeats, args.out)
    else:
        run(args.folder, args.out, args.seq_len, args.overrides + rest)


if __name__ == "__main__":
    main()
