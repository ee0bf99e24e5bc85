"""The embedded corpus and tokenizer: built offline, cached atomically, deterministic, loadable."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from composer_dlm.data import (
    LoaderConfig,
    build_dataloader,
    ensure_embedded_corpus,
    load_tokenizer,
    mask_token_id,
)
from composer_dlm.data.embedded import CACHE_ENV, corpus_documents, embedded_root, ensure_embedded_tokenizer

SEQ = 64


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh cache for this module; the tests below build into it in order."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(path))
        yield path


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_corpus_is_real_english_from_the_standard_library() -> None:
    docs = corpus_documents()
    assert len(docs) > 150
    assert sum(len(text) for _, text in docs) > 500_000
    titles = dict(docs)
    assert "assert" in titles["topic assert"] and " the " in titles["topic assert"]
    assert any(title == "module json" for title, _ in docs)
    assert docs == corpus_documents()  # fixed order


def test_tokenizer_is_built_cached_and_has_the_special_tokens(cache: Path) -> None:
    path = ensure_embedded_tokenizer()
    assert path == embedded_root() / "tokenizer" and path.is_relative_to(cache)
    tok = load_tokenizer("embedded")
    assert len(tok) == 4096
    assert (tok.eos_token, tok.bos_token, tok.mask_token) == (
        "<|endoftext|>",
        "<|startoftext|>",
        "<|mdm_mask|>",
    )
    assert mask_token_id(tok) == 2
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    text = corpus_documents()[0][1]
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text and len(ids) < len(text) / 3  # lossless, and it does compress
    mtime = (path / "tokenizer.json").stat().st_mtime_ns
    assert ensure_embedded_tokenizer() == path and (path / "tokenizer.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_loaders_read_the_embedded_corpus(cache: Path, mode: str) -> None:
    root = ensure_embedded_corpus(SEQ, mode)
    assert root == embedded_root() / f"{mode}-seq{SEQ}"
    assert {p.name for p in root.iterdir()} == {"train", "val"}
    tok = load_tokenizer("embedded")
    for split in ("train", "val"):
        cfg = LoaderConfig(local="embedded", split=split, num_workers=0)
        loader = build_dataloader(cfg, tokenizer=tok, mode=mode, max_seq_len=SEQ, device_batch_size=4)
        batch = next(iter(loader))
        assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= SEQ
        if mode == "sft":
            row = batch["input_ids"][0]
            prompt = tok.decode(row[: batch["prompt_lengths"][0]])
            assert prompt.startswith("<|startoftext|><|start_header_id|>user") and prompt.endswith(
                "assistant<|end_header_id|>\n\n"
            )
            assert batch["prompt_lengths"].max() < batch["input_ids"].shape[1]
        else:
            assert batch["input_ids"].dtype == torch.long
        del loader, batch
    with pytest.raises(ValueError, match="set `split`"):
        build_dataloader(
            LoaderConfig(local="embedded", num_workers=0),
            tokenizer=tok,
            mode=mode,
            max_seq_len=SEQ,
            device_batch_size=4,
        )


def _build_in(cache_path: str) -> None:
    os.environ[CACHE_ENV] = cache_path
    ensure_embedded_corpus(SEQ)


def test_build_is_deterministic_and_safe_under_concurrency(cache: Path, tmp_path: Path) -> None:
    """Two processes build into one fresh cache at the same time; the result equals the module's build."""
    reference = ensure_embedded_corpus(SEQ)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_in, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    fresh_root = tmp_path / embedded_root().name
    assert sorted(p.name for p in fresh_root.iterdir() if not p.name.endswith(".lock")) == [
        f"pretrain-seq{SEQ}",
        "tokenizer",
    ]
    assert files_of(fresh_root / "tokenizer") == files_of(reference.parent / "tokenizer")
    assert files_of(fresh_root / f"pretrain-seq{SEQ}") == files_of(reference)
