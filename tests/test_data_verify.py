"""Damaged shard folders are named in one line when the loader is built, before any batch is read.

Shards are made here by our converter (xxh3 hashes in index.json); each case damages one file the way a
bad copy or a full disk does and expects a DataError naming that file, raised by build_dataloader.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from composer_dlm.data import (
    ConvertConfig,
    DataError,
    LoaderConfig,
    build_dataloader,
    convert,
    load_tokenizer,
)
from composer_dlm.data.tokenizer import train_bpe_tokenizer

SEQ = 16
WORDS = "one two three four five six seven eight nine ten red green blue cat dog sun moon".split()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A converted folder (train/ with several shards, val/) and its tokenizer folder."""
    root = tmp_path_factory.mktemp("verify")
    docs = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(30)) for i in range(120)]
    train_bpe_tokenizer(docs, vocab_size=300).save_pretrained(str(root / "tok"))
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    convert(
        ConvertConfig(
            inputs=[str(root / "docs.jsonl")],
            out=str(root / "data"),
            tokenizer=str(root / "tok"),
            seq_len=SEQ,
            val_fraction=0.1,
            shard_size="1kb",
            progress=False,
        )
    )
    assert len(list((root / "data" / "train").glob("shard.*.mds"))) >= 3
    return root / "data", str(root / "tok")


def build(local: Path, tok: str, split: str = "train") -> None:
    cfg = LoaderConfig(local=str(local), split=split, num_workers=0, shuffle=False)
    loader = build_dataloader(
        cfg, tokenizer=load_tokenizer(tok), mode="pretrain", max_seq_len=SEQ, device_batch_size=2
    )
    next(iter(loader))


def flip_byte(folder: Path) -> str:
    shard = folder / "shard.00001.mds"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    return f"shard {shard} is corrupt: its xxh3_64 hash differs from its index's"


def truncate(folder: Path) -> str:
    shard = folder / "shard.00002.mds"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size - 10])
    return f"shard {shard} has {size - 10} bytes, its index says {size} (truncated or replaced)"


def delete_shard(folder: Path) -> str:
    (folder / "shard.00000.mds").unlink()
    return f"shard {folder / 'shard.00000.mds'} is missing"


def delete_index(folder: Path) -> str:
    (folder / "index.json").unlink()
    return f"{folder / 'index.json'} is missing, so the shards there cannot be read"


def garble_index(folder: Path) -> str:
    (folder / "index.json").write_text('{"shards": [')
    return f"{folder / 'index.json'} is corrupt (JSONDecodeError"


@pytest.mark.parametrize("damage", [flip_byte, truncate, delete_shard, delete_index, garble_index])
def test_damaged_split_is_named_at_loader_build(
    pristine: tuple[Path, str], tmp_path: Path, damage: Callable[[Path], str]
) -> None:
    data, tok = pristine
    shutil.copytree(data, tmp_path / "data")
    build(tmp_path / "data", tok)  # the copy is whole
    message = damage(tmp_path / "data" / "train")
    with pytest.raises(DataError) as info:
        build(tmp_path / "data", tok)
    assert str(info.value).startswith(message), str(info.value)
    assert "convert the data again with composer-dlm-convert" in str(info.value)
    build(tmp_path / "data", tok, split="val")  # the other split is untouched and still reads


def test_index_counting_other_samples_than_the_manifest(pristine: tuple[Path, str], tmp_path: Path) -> None:
    """index.json and manifest.json from different conversions (e.g. a partial copy over an old folder)."""
    data, tok = pristine
    shutil.copytree(data, tmp_path / "data")
    train = tmp_path / "data" / "train"
    shutil.copy(data / "val" / "manifest.json", train / "manifest.json")
    val_samples = json.loads((data / "val" / "manifest.json").read_text())["counts"]["samples"]
    with pytest.raises(DataError, match=rf"{train}: the index lists \d+ samples, the manifest {val_samples}"):
        build(tmp_path / "data", tok)
