"""Convert a corpus (text, JSONL, Parquet files or folders of them, or a Hugging Face dataset) to MDS shards.

    python scripts/convert_to_mds.py INPUT [INPUT ...] --out DIR --tokenizer TOK --seq-len N \\
        [--mode {pretrain,sft}] [--val-fraction F] ...

The same command as the installed `composer-dlm-convert`; see --help. The work is done by
composer_dlm.commands.convert and composer_dlm.data.convert.
"""

from __future__ import annotations

import sys

from composer_dlm.commands import convert


def main(argv: list[str]) -> int:
    return convert(argv, prog="convert_to_mds.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
