"""The embedded corpus as MDS shards, for pretraining or SFT, converted with our own converter.

`ensure_embedded_corpus(seq_len, mode)` converts the generated corpus (composer_dlm.data.synthetic) with
the embedded tokenizer into `<cache>/<mode>-seq<seq_len>/{train,val}`, on first use, atomically (see
composer_dlm.data.embedded). Deterministic: the same recipe gives the same shards, byte for byte.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from composer_dlm.data.convert import MODES, ConvertConfig, convert
from composer_dlm.data.embedded import build_once, embedded_root, ensure_embedded_tokenizer, resolve_tokenizer
from composer_dlm.data.errors import DataError
from composer_dlm.data.synthetic import documents, sft_pairs
from composer_dlm.data.tokenizer import EMBEDDED, tokenizer_fingerprint

VAL_FRACTION = 0.05
MIN_VAL_SEQUENCES = 8  # long sequences need a larger validation share of this small corpus
CHARS_PER_TOKEN = 4.0  # about what the embedded tokenizer gives on the generated corpus


def check_run_tokenizer(tokenizer: Any) -> None:
    """Refuse a run whose tokenizer is not the embedded one but whose loader reads the embedded corpus.

    The embedded shards hold the embedded tokenizer's ids, so they are meaningless to any other tokenizer;
    the usual cause is a changed tokenizer.name with the loaders left at `local: embedded`.
    """
    if tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(resolve_tokenizer(EMBEDDED)):
        return
    name = getattr(tokenizer, "name_or_path", "?")
    raise DataError(
        f"a loader reads `local: embedded`, the built-in corpus in the embedded tokenizer's ids, but the run's "
        f"tokenizer is {name!r}; convert your data with it (`composer-dlm-convert INPUT --out DIR "
        f"--tokenizer {name} --seq-len N --val-fraction 0.01`) and set train_loader.local=DIR "
        "(and eval_loader.local=DIR unless your YAML makes it follow), or set tokenizer.name=embedded"
    )


def ensure_embedded_corpus(seq_len: int, mode: str = "pretrain") -> Path:
    """The folder of the embedded corpus as MDS shards (`train/`, `val/`) for `mode` at `seq_len`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ensure_embedded_tokenizer()

    def build(tmp: Path) -> None:
        if mode == "pretrain":
            docs = documents()
            rows = [{"text": text} for text in docs]
            wanted = MIN_VAL_SEQUENCES * seq_len * CHARS_PER_TOKEN / sum(len(text) for text in docs)
            val_fraction = min(0.3, max(VAL_FRACTION, wanted))
        else:
            rows = sft_pairs()
            val_fraction = VAL_FRACTION
        with tempfile.TemporaryDirectory() as src:
            jsonl = Path(src) / f"{mode}.jsonl"
            with jsonl.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            cfg = ConvertConfig(
                inputs=[str(jsonl)],
                out=str(tmp),
                tokenizer=EMBEDDED,
                mode=mode,
                seq_len=seq_len,
                val_fraction=val_fraction,
                overlong="truncate",
                progress=False,
            )
            convert(cfg)

    return build_once(embedded_root() / f"{mode}-seq{seq_len}", build)
