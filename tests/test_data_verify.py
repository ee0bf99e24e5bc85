"""Damaged shard folders are named in one line when the loader is built, before any batch is read.

Shards are made here by our converter (xxh3 hashes in index.json); each case damages one file the way a
bad copy or a full disk does and expects a DataError naming that file, raised by build_dataloader.
"""

from __future__ import annotations

import json
import os
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
    verify,
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


def many_shards(pristine_train: Path, out: Path, num_shards: int) -> Path:
    """A readable split of `num_shards` shards: the first shard of `pristine_train` hard-linked `num_shards`
    times, with an index listing each link and a manifest counting their samples (a corpus this large goes
    through the converter too slowly for a test)."""
    index = json.loads((pristine_train / "index.json").read_text())
    entry = index["shards"][0]
    split = out / "train"
    split.mkdir(parents=True)
    shards = []
    for i in range(num_shards):
        name = f"shard.{i:05}.mds"
        os.link(pristine_train / entry["raw_data"]["basename"], split / name)
        shards.append(entry | {"raw_data": entry["raw_data"] | {"basename": name}})
    (split / "index.json").write_text(json.dumps(index | {"shards": shards}))
    manifest = json.loads((pristine_train / "manifest.json").read_text())
    manifest["counts"]["samples"] = num_shards * entry["samples"]
    (split / "manifest.json").write_text(json.dumps(manifest))
    return out


def counting_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The shard files whose bytes verification reads from now on (verify.shard_hash is its only reader)."""
    read: list[Path] = []
    original = verify.shard_hash

    def count(path: Path) -> str:
        read.append(path)
        return original(path)

    monkeypatch.setattr(verify, "shard_hash", count)
    return read


def test_second_start_reads_no_shard_bytes_at_20k_shards(
    pristine: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`verify: quick` (the default): the first loader build hashes each of 20,000 shards, the second none;
    a shard replaced since by a damaged copy is hashed again and named; `verify: full` hashes every start."""
    data, tok = pristine
    local = many_shards(data / "train", tmp_path / "data", 20_000)
    read = counting_hashes(monkeypatch)
    build(local, tok)
    assert len(read) == 20_000 and len(set(read)) == 20_000
    read.clear()
    build(local, tok)
    assert read == []
    bad = local / "train" / "shard.12345.mds"
    copy = bytearray(bad.read_bytes())
    copy[len(copy) // 2] ^= 0x40
    bad.unlink()
    bad.write_bytes(bytes(copy))
    with pytest.raises(DataError, match=f"shard {bad} is corrupt"):
        build(local, tok)
    assert read == [bad]


def test_full_catches_damage_that_quick_cannot_see(
    pristine: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte flipped in place with the modification time put back (a failing disk): the stamp still matches,
    so `quick` reads nothing; `full` hashes every shard and names the damaged one; `off` checks nothing."""
    data, tok = pristine
    shutil.copytree(data, tmp_path / "data")
    split = tmp_path / "data" / "train"
    build(tmp_path / "data", tok)
    shard = split / "shard.00001.mds"
    st = shard.stat()
    corrupt = bytearray(shard.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0x40
    with shard.open("r+b") as f:
        f.write(bytes(corrupt))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    read = counting_hashes(monkeypatch)
    verify.verify_split(split, num_samples(split), "quick")
    assert read == []
    with pytest.raises(DataError, match=f"shard {shard} is corrupt"):
        verify.verify_split(split, num_samples(split), "full")
    (split / "shard.00002.mds").unlink()
    verify.verify_split(split, num_samples(split), "off")


def test_read_only_shard_folder_keeps_its_stamp_in_the_cache(
    pristine: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the shard folder refuses writes (read-only mounts; simulated, as the tests may run as root), the
    stamp goes to the user's cache and the second start still reads no shard bytes."""
    data, _ = pristine
    shutil.copytree(data, tmp_path / "data")
    split = tmp_path / "data" / "train"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write = verify.write_text_atomic

    def read_only_split(path: Path, text: str) -> None:
        if path.parent == split:
            raise PermissionError(13, "Read-only file system", str(path))
        write(path, text)

    monkeypatch.setattr(verify, "write_text_atomic", read_only_split)
    read = counting_hashes(monkeypatch)
    verify.verify_split(split, num_samples(split))
    shards = len(list(split.glob("shard.*.mds")))
    assert len(read) == shards
    assert not (split / verify.STAMP_NAME).exists()
    assert len(list((tmp_path / "cache" / "composer_dlm" / "verified").glob("*.json"))) == 1
    verify.verify_split(split, num_samples(split))
    assert len(read) == shards  # the second start read nothing


def num_samples(split: Path) -> int:
    return int(json.loads((split / "manifest.json").read_text())["counts"]["samples"])


def test_verify_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="loader: verify must be one of quick, full, off, got 'fast'"):
        LoaderConfig(local="x", verify="fast")
