"""Convert a corpus (text, JSONL, Parquet files or folders of them) to MDS shards for composer_dlm.

    python scripts/convert_to_mds.py INPUT [INPUT ...] --out DIR --tokenizer TOK --seq-len N [--sft] ...

Writes DIR/train (and DIR/val with --val-fraction) with a manifest.json each; see --help.
The work is done by composer_dlm.data.convert.
"""

from __future__ import annotations

import argparse
import sys

from composer_dlm.data import ConvertConfig, DataError, Fields, convert


def parse_args(argv: list[str]) -> ConvertConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "inputs", nargs="+", help="files (.txt/.md: one document each; .jsonl; .parquet) or folders"
    )
    p.add_argument("--out", required=True, help="output folder (must be empty or absent, see --overwrite)")
    p.add_argument("--tokenizer", required=True, help="'embedded' or a local Hugging Face tokenizer folder")
    p.add_argument(
        "--seq-len", type=int, required=True, help="pretraining: tokens per sequence; SFT: max tokens"
    )
    p.add_argument("--sft", action="store_true", help="SFT mode: prompt/response pairs or chat messages")
    p.add_argument("--text-field", default="text", help="pretraining text field/column (default: text)")
    p.add_argument("--prompt-field", default="prompt", help="SFT prompt field (default: prompt)")
    p.add_argument("--response-field", default="response", help="SFT answer field (default: response)")
    p.add_argument("--messages-field", default="messages", help="SFT chat field (default: messages)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of records for DIR/val (default 0)")
    p.add_argument("--max-samples", type=int, help="read only the first N records (documents/conversations)")
    p.add_argument(
        "--overlong", choices=["drop", "truncate"], default="drop", help="SFT samples over --seq-len"
    )
    p.add_argument("--drop-empty-answers", action="store_true", help="skip SFT records with an empty answer")
    p.add_argument("--compression", help="shard compression, e.g. zstd or zstd:7 (default: none)")
    p.add_argument("--shard-size", default="64mb", help="shard size limit (default 64mb)")
    p.add_argument("--num-proc", type=int, default=1, help="tokenisation processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        return ConvertConfig(
            inputs=a.inputs,
            out=a.out,
            tokenizer=a.tokenizer,
            mode="sft" if a.sft else "pretrain",
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
        )
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str]) -> None:
    cfg = parse_args(argv)
    try:
        summary = convert(cfg)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(summary.format())


if __name__ == "__main__":
    main(sys.argv[1:])
