"""The embedded corpus and tokenizer: generated offline, the same on every Python, cached atomically, loadable."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from faults import run_spawned

from composer_dlm.data import (
    DataError,
    LoaderConfig,
    build_dataloader,
    ensure_embedded_corpus,
    load_tokenizer,
    mask_token_id,
    synthetic,
)
from composer_dlm.data.embedded import CACHE_ENV, VOCAB_SIZE, embedded_root, ensure_embedded_tokenizer
from composer_dlm.data.tokenizer import train_bpe_tokenizer
from composer_dlm.data.verify import STAMP_NAME

SEQ = 64
# sha256 of json.dumps([documents(), sft_pairs()]): the corpus depends on synthetic.py alone, not on the
# Python running it. Change it only together with synthetic.py (and RECIPE_VERSION in embedded.py).
CORPUS_SHA256 = "38fcb3f2a5ec25a5e13c3297dfade7dd26170140f266f7ed58931321be772364"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh cache for this module; the tests below build into it in order."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(path))
        yield path


def files_of(folder: Path) -> dict[str, bytes]:
    """The files a build wrote (not the stamp a loader's shard check leaves, composer_dlm.data.verify)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != STAMP_NAME
    }


def test_corpus_is_pinned_and_independent_of_the_interpreter() -> None:
    docs, pairs = synthetic.documents(), synthetic.sft_pairs()
    assert len(docs) == synthetic.NUM_DOCUMENTS and len(pairs) == synthetic.NUM_SFT_PAIRS
    digest = hashlib.sha256(json.dumps([docs, pairs]).encode()).hexdigest()
    assert digest == CORPUS_SHA256
    # the first draws of splitmix64 from seed 0, as published with the algorithm's reference code
    rng = synthetic.Rng(0)
    assert [rng.next() for _ in range(2)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


def test_corpus_sentences_state_true_facts_and_sums() -> None:
    """Every checkable sentence is checked against the tables and plain arithmetic."""
    text = "\n".join(synthetic.documents())
    words = {w: i for i, w in enumerate(synthetic.NUMBER_WORDS)}
    sums = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", text)
    assert len(sums) > 1000
    for a, op, b, c in sums:
        assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    spelled = re.findall(r"(\w+) (plus|minus) (\w+) is (\w+)\.", text)
    assert len(spelled) > 1000
    for a, op, b, c in spelled:
        a, b, c = words[a.lower()], words[b], words[c]
        assert c == (a + b if op == "plus" else a - b)
    capitals = re.findall(r"The capital of ([A-Z]\w+) is ([A-Z][\w ]+?)\.", text)
    assert len(capitals) > 200 and set(capitals) <= set(synthetic.CAPITALS)
    for name, subject, possessive in synthetic.PEOPLE:  # pronouns agree with the person
        stories = re.findall(rf"{name} went to [\w ]+\. (\w+) took (\w+) ", text)
        assert len(stories) > 10 and set(stories) == {(subject.capitalize(), possessive)}
    for pair in synthetic.sft_pairs(200):
        if m := re.fullmatch(r"What is (\d+)([+-])(\d+)\?", pair["prompt"]):
            a, op, b = int(m[1]), m[2], int(m[3])
            assert pair["response"] == f"{a + b if op == '+' else a - b}."


def test_tokenizer_is_built_cached_and_has_the_special_tokens(cache: Path) -> None:
    path = ensure_embedded_tokenizer()
    assert path == embedded_root() / "tokenizer" and path.is_relative_to(cache)
    tok = load_tokenizer("embedded")
    assert 500 < len(tok) <= VOCAB_SIZE  # BPE runs out of merges on the small generated vocabulary
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
    text = synthetic.documents()[0]
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
    assert run_spawned(_build_in, [(str(tmp_path),)] * 2) == [0, 0]
    fresh_root = tmp_path / embedded_root().name
    assert sorted(p.name for p in fresh_root.iterdir() if not p.name.endswith(".lock")) == [
        f"pretrain-seq{SEQ}",
        "tokenizer",
    ]
    assert files_of(fresh_root / "tokenizer") == files_of(reference.parent / "tokenizer")
    assert files_of(fresh_root / f"pretrain-seq{SEQ}") == files_of(reference)


def test_embedded_loader_refuses_another_tokenizer(cache: Path, tmp_path: Path) -> None:
    """tokenizer.name changed, loaders left at `local: embedded`: one message saying what to convert."""
    train_bpe_tokenizer(synthetic.documents(200), vocab_size=300).save_pretrained(str(tmp_path / "tok"))
    other = load_tokenizer(str(tmp_path / "tok"))
    with pytest.raises(DataError) as info:
        build_dataloader(
            LoaderConfig(local="embedded", split="val", num_workers=0),
            tokenizer=other,
            mode="pretrain",
            max_seq_len=SEQ,
            device_batch_size=4,
        )
    assert str(info.value).startswith(
        "a loader reads `local: embedded`, the built-in corpus in the embedded tokenizer's ids, but the run's "
        f"tokenizer is '{tmp_path / 'tok'}'; convert your data with it (`composer-dlm-convert INPUT "
        f"--out DIR --tokenizer {tmp_path / 'tok'} --seq-len N --val-fraction 0.01`)"
    )
