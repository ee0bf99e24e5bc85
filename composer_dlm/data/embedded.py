"""The embedded tokenizer, and the one place that resolves a tokenizer name ('embedded' or a folder).

The embedded tokenizer is a byte-level BPE (EOS, BOS, mask and chat tokens, a chat template) trained on
the generated corpus of composer_dlm.data.synthetic, so it needs no download and is the same on every
Python. It is built on first use and cached under $COMPOSER_DLM_CACHE (default ~/.cache/composer_dlm), in a
folder keyed by the recipe version. Every cached artefact (this tokenizer, and the shards that
composer_dlm.data.embedded_shards builds) is made in a temporary folder under a file lock and renamed into
place, so concurrent processes (e.g. the ranks of one node) build it once and never see it half-written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from transformers import PreTrainedTokenizerBase

from composer_dlm.data.synthetic import documents, sft_pairs
from composer_dlm.data.tokenizer import EMBEDDED, load_tokenizer, train_bpe_tokenizer
from composer_dlm.fsutil import STAGING_MARK, staged_folder

CACHE_ENV = "COMPOSER_DLM_CACHE"
RECIPE_VERSION = 4  # bump whenever the corpus, tokenizer or conversion recipe changes
VOCAB_SIZE = 4096  # an upper bound: BPE stops earlier when the corpus has no more pairs to merge


def cache_dir() -> Path:
    """The cache root: $COMPOSER_DLM_CACHE, else ~/.cache/composer_dlm."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/composer_dlm").expanduser()


def embedded_root() -> Path:
    return cache_dir() / f"embedded-r{RECIPE_VERSION}"


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, building it first (into a temporary sibling, renamed) unless it exists."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.is_dir():
            return final
        for stale in final.parent.glob(
            f".*{final.name}{STAGING_MARK}*"
        ):  # left by a killed build (and its convert)
            shutil.rmtree(stale, ignore_errors=True)
        with staged_folder(final) as tmp:
            build(tmp)
    return final


def ensure_embedded_tokenizer() -> Path:
    """The folder of the embedded tokenizer (Hugging Face format), built and cached on first use."""

    def build(tmp: Path) -> None:
        texts = documents()
        texts += [f"{p['prompt']} {p['response']}" for p in sft_pairs()]
        train_bpe_tokenizer(texts, vocab_size=VOCAB_SIZE).save_pretrained(str(tmp))

    return build_once(embedded_root() / "tokenizer", build)


def resolve_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer a config or CLI names: 'embedded' (built on first use), else what load_tokenizer takes."""
    if name == EMBEDDED:
        return load_tokenizer(str(ensure_embedded_tokenizer()))
    return load_tokenizer(name)
