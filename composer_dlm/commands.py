"""The console commands of the installed package, each also a script in scripts/ (a thin wrapper):

    composer-dlm-convert      scripts/convert_to_mds.py   a corpus or Hugging Face dataset -> MDS shards
    composer-dlm-benchmark    scripts/benchmark.py        kernel, loader, train and sampler benchmarks
    composer-dlm-make-yamls   scripts/make_yamls.py       a grid of run configs
    composer-dlm-train        composer_dlm.train:main     (its own module; `composer composer_dlm/train.py`)
    composer-dlm-generate     composer_dlm.generate_cli:main

Imports nothing heavy at module level, so --help and a bad flag answer without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from composer_dlm.cli import ArgumentParser, fail, report_interrupt

CONVERT_DOC = """Convert a corpus to MDS shards for composer_dlm: text, JSONL or Parquet files (or folders of
them), or a Hugging Face dataset.

    composer-dlm-convert INPUT [INPUT ...] --out DIR --tokenizer TOK --seq-len N [--mode {pretrain,sft}] ...
    composer-dlm-convert --hf-dataset NAME [--hf-config C] [--hf-split S] --out DIR --tokenizer TOK ...
    (the same as python scripts/convert_to_mds.py ...)

Writes DIR/train (and DIR/val with --val-fraction), each with its shards, index.json and manifest.json.
--out s3://bucket/path (or another Streaming remote) uploads them instead. Point a run at them with
`train_loader.local=DIR train_loader.split=train` and `eval_loader.local=DIR eval_loader.split=val`.
"""

BENCHMARKS = {
    "kernel": "composer_dlm.benchmarks.kernel",
    "loader": "composer_dlm.benchmarks.loader",
    "train": "composer_dlm.benchmarks.train",
    "sampler": "composer_dlm.benchmarks.sampler",
    "fast_accuracy": "composer_dlm.benchmarks.fast_accuracy",
    "likelihood": "composer_dlm.benchmarks.likelihood",
    "startup": "composer_dlm.benchmarks.startup",
    "table": "composer_dlm.benchmarks.tables",
    "fp8": "composer_dlm.benchmarks.fp8",
    "moe": "composer_dlm.benchmarks.moe",
}


def parse_convert_args(argv: list[str], prog: str) -> argparse.Namespace:
    p = ArgumentParser(
        prog=prog, description=CONVERT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "inputs", nargs="*", help="files (.txt/.md: one document each; .jsonl; .parquet) or folders"
    )
    p.add_argument(
        "--hf-dataset",
        metavar="NAME",
        help="instead of INPUT: a Hugging Face dataset (hub id, a save_to_disk folder, or json/parquet/csv "
        "with --hf-data-files); needs the hf extra",
    )
    p.add_argument("--hf-config", help="the dataset's configuration (subset), e.g. wikitext-103-raw-v1")
    p.add_argument("--hf-split", default="train", help="the dataset split to convert (default: train)")
    p.add_argument(
        "--hf-data-files",
        nargs="+",
        default=[],
        metavar="FILE",
        help="files for --hf-dataset json/parquet/csv",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder (must be empty or absent, see --overwrite), or s3://bucket/path etc. to upload the "
        "shards through Streaming's writer (credentials from the environment)",
    )
    p.add_argument("--tokenizer", required=True, help="'embedded' or a local Hugging Face tokenizer folder")
    p.add_argument(
        "--seq-len", type=int, required=True, help="pretraining: tokens per sequence; SFT: max tokens"
    )
    p.add_argument(
        "--mode",
        choices=["pretrain", "sft"],
        default="pretrain",
        help="pretrain: documents packed into sequences (default); sft: prompt/response pairs or chat messages",
    )
    p.add_argument("--sft", dest="mode", action="store_const", const="sft", help="the same as --mode sft")
    p.add_argument("--text-field", default="text", help="pretraining text field/column (default: text)")
    p.add_argument("--prompt-field", default="prompt", help="SFT prompt field (default: prompt)")
    p.add_argument("--response-field", default="response", help="SFT answer field (default: response)")
    p.add_argument("--messages-field", default="messages", help="SFT chat field (default: messages)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of records for DIR/val (default 0)")
    p.add_argument("--max-samples", type=int, help="read only the first N records (documents/conversations)")
    p.add_argument(
        "--overlong",
        choices=["drop", "truncate"],
        default="drop",
        help="SFT samples over --seq-len: drop them (default) or cut their answers",
    )
    p.add_argument("--drop-empty-answers", action="store_true", help="skip SFT records with an empty answer")
    p.add_argument("--compression", help="shard compression, e.g. zstd or zstd:7 (default: none)")
    p.add_argument("--shard-size", default="64mb", help="shard size limit (default 64mb)")
    p.add_argument("--num-proc", type=int, default=1, help="tokenisation processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if not a.inputs and not a.hf_dataset:
        p.error("give INPUT files or folders, or --hf-dataset NAME")
    return a


def convert(argv: list[str] | None = None, prog: str = "composer-dlm-convert") -> int:
    """composer-dlm-convert (scripts/convert_to_mds.py): a corpus or Hugging Face dataset -> MDS shards."""
    a = parse_convert_args(sys.argv[1:] if argv is None else argv, prog)
    from composer_dlm.data import ConvertConfig, DataError, Fields  # after --help: loads torch
    from composer_dlm.data import convert as run_conversion
    from composer_dlm.data.sources import HFDataset

    hf = HFDataset(a.hf_dataset, a.hf_config, a.hf_split, a.hf_data_files) if a.hf_dataset else None

    try:
        cfg = ConvertConfig(
            inputs=a.inputs,
            out=a.out,
            tokenizer=a.tokenizer,
            mode=a.mode,
            seq_len=a.seq_len,
            fields=Fields(a.text_field, a.prompt_field, a.response_field, a.messages_field),
            val_fraction=a.val_fraction,
            max_samples=a.max_samples,
            compression=a.compression,
            num_proc=a.num_proc,
            overlong=a.overlong,
            drop_empty_answers=a.drop_empty_answers,
            overwrite=a.overwrite,
            shard_size=a.shard_size,
            progress=not a.no_progress,
            hf_dataset=hf,
        )
    except ValueError as e:  # an option out of range
        fail(str(e))
    try:
        summary = run_conversion(cfg)
    except DataError as e:
        fail(str(e))
    except KeyboardInterrupt:  # the conversion wrote into a staging folder, removed on the way out
        return report_interrupt(
            f"interrupted (Ctrl-C); nothing was written to {a.out}, run the command again"
        )
    print(summary.format())
    return 0


def benchmark(argv: list[str] | None = None, prog: str = "composer-dlm-benchmark") -> int:
    """composer-dlm-benchmark NAME [options] (scripts/benchmark.py): runs benchmark NAME's `main`."""
    argv = sys.argv[1:] if argv is None else argv
    names = ", ".join(BENCHMARKS)
    usage = f"usage: {prog} {{{names}}} [options]  (--help after a name for its options)"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        fail(f"{prog}: name a benchmark, one of {names} ({usage})")
    importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])
    return 0


def make_yamls(argv: list[str] | None = None, prog: str = "composer-dlm-make-yamls") -> int:
    """composer-dlm-make-yamls grid.yaml [--out DIR] (scripts/make_yamls.py): writes a grid of run configs."""
    parser = ArgumentParser(
        prog=prog,
        description="Write a grid of run configs from a description (see composer_dlm/grid.py for its format).",
    )
    parser.add_argument("description", help="YAML with base, models, datasets, modes")
    parser.add_argument("--out", default=None, help="output folder (default: the description's 'out')")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from composer_dlm.config import ConfigError  # after --help: the config schema loads torch
    from composer_dlm.grid import make_grid

    try:
        for path in make_grid(args.description, out=args.out):
            print(path)
    except ConfigError as err:
        fail(str(err))
    return 0
