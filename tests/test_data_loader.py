"""Loaders over MDS shards: batches, SFT padding, resumption, subsets, remote paths, errors, stale memory."""

from __future__ import annotations

import gc
import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from faults import run_spawned
from streaming import LocalDataset, StreamingDataset

from composer_dlm.data import (
    ConvertConfig,
    DataError,
    LoaderConfig,
    SFTCollator,
    build_dataloader,
    convert,
    load_tokenizer,
)
from composer_dlm.data.tokenizer import train_bpe_tokenizer

WORDS = "masked diffusion models unmask a sequence step by step from all mask tokens to text".split()
SEQ = 16
SFT_SEQ = 160


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loader")
    train_bpe_tokenizer(sentences(100, 0), vocab_size=300).save_pretrained(str(root / "tok"))
    train_bpe_tokenizer(sentences(100, 1), vocab_size=280).save_pretrained(str(root / "other_tok"))
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(80, 2)))
    pairs = root / "pairs.jsonl"
    qa = zip(sentences(40, 3), sentences(40, 4), strict=True)
    pairs.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in qa))
    common = {"tokenizer": str(root / "tok"), "progress": False}
    convert(ConvertConfig(inputs=[str(docs)], out=str(root / "pre"), seq_len=SEQ, val_fraction=0.2, **common))
    convert(ConvertConfig(inputs=[str(pairs)], out=str(root / "sft"), mode="sft", seq_len=SFT_SEQ, **common))
    return {"root": str(root), "tok": str(root / "tok"), "other_tok": str(root / "other_tok")}


def build(cfg: LoaderConfig, tok_path: str, mode: str = "pretrain", seq: int = SEQ, batch: int = 4):
    return build_dataloader(
        cfg, tokenizer=load_tokenizer(tok_path), mode=mode, max_seq_len=seq, device_batch_size=batch
    )


def raw_samples(folder: str) -> list[dict]:
    """Every sample, in order, through Streaming's LocalDataset (no shared memory, no descriptors left open)."""
    ds = LocalDataset(folder)
    return [ds[i] for i in range(len(ds))]


def collect(loader, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if limit is not None and len(batches) == limit:
            break
    return batches


def release(loader) -> None:
    """Stop a loader's Streaming threads, which an iteration left midway keeps running (and its
    dataset, with its shared memory, alive) until the next epoch starts."""
    dataset = loader.dataset
    if hasattr(dataset, "_iterator"):
        dataset._iterator.non_blocking_exit()
    if hasattr(dataset, "_executor"):
        dataset._executor.shutdown(wait=True)
    gc.collect()


def cfg_for(local: str, **kw) -> LoaderConfig:
    return LoaderConfig(local=local, **{"num_workers": 0, "persistent_workers": False, **kw})


def test_pretrain_batches_are_the_shards_in_order(data: dict[str, str]) -> None:
    folder = os.path.join(data["root"], "pre")
    loader = build(cfg_for(folder, split="train", shuffle=False), data["tok"])
    batches = collect(loader)
    release(loader)
    expected = torch.tensor([s["tokens"].tolist() for s in raw_samples(os.path.join(folder, "train"))])
    assert all(set(b) == {"input_ids"} and b["input_ids"].dtype == torch.long for b in batches)
    assert all(b["input_ids"].shape == (4, SEQ) for b in batches)
    got = torch.cat([b["input_ids"] for b in batches])
    assert len(batches) == len(expected) // 4  # drop_last
    assert torch.equal(got, expected[: len(got)])


def test_sft_batches_right_pad_answers_with_eos(data: dict[str, str]) -> None:
    folder = os.path.join(data["root"], "sft")
    eos = load_tokenizer(data["tok"]).eos_token_id
    samples = raw_samples(os.path.join(folder, "train"))
    for pad_to in ("longest", "max_seq_len"):
        loader = build(
            cfg_for(folder, split="train", shuffle=False, pad_to=pad_to), data["tok"], "sft", SFT_SEQ
        )
        batches = collect(loader)
        release(loader)
        assert len(batches) == len(samples) // 4  # drop_last; so the checks below run on every batch
        rows = iter(samples)
        for batch in batches:
            ids, prompt_lengths = batch["input_ids"], batch["prompt_lengths"]
            assert (
                ids.dtype == torch.long
                and prompt_lengths.dtype == torch.long
                and prompt_lengths.shape == (4,)
            )
            group = [next(rows) for _ in range(4)]
            longest = max(len(s["tokens"]) for s in group)
            assert ids.shape[1] == (longest if pad_to == "longest" else SFT_SEQ)
            for row, s in enumerate(group):
                n = len(s["tokens"])
                assert ids[row, :n].tolist() == s["tokens"].tolist()
                assert (ids[row, n:] == eos).all()
                assert prompt_lengths[row] == int(s["prompt_length"])


def test_sft_collator_by_hand() -> None:
    samples = [
        {"input_ids": torch.tensor([5, 6, 7]), "prompt_length": 1},
        {"input_ids": torch.tensor([8, 9]), "prompt_length": 2},
    ]
    out = SFTCollator(eos_token_id=0)(samples)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert out["prompt_lengths"].tolist() == [1, 2]
    out = SFTCollator(eos_token_id=0, pad_to_length=5)(samples)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 0, 0, 0]]
    with pytest.raises(ValueError, match="does not fit pad_to_length 2"):
        SFTCollator(eos_token_id=0, pad_to_length=2)(samples)


@pytest.mark.parametrize(("mode", "num_workers"), [("pretrain", 0), ("sft", 2)])
def test_mid_epoch_resumption_continues_exactly(data: dict[str, str], mode: str, num_workers: int) -> None:
    folder = os.path.join(data["root"], "pre" if mode == "pretrain" else "sft")
    seq = SEQ if mode == "pretrain" else SFT_SEQ
    cfg = cfg_for(folder, split="train", shuffle=True, shuffle_seed=3, num_workers=num_workers)
    batch, k = 2, 3

    loader = build(cfg, data["tok"], mode, seq, batch)
    reference = collect(loader)
    release(loader)

    loader = build(cfg, data["tok"], mode, seq, batch)
    first = collect(loader, limit=k)
    state = loader.dataset.state_dict(num_samples=k * batch, from_beginning=True)  # what Composer calls
    release(loader)

    loader = build(cfg, data["tok"], mode, seq, batch)
    loader.dataset.load_state_dict(state)
    rest = collect(loader)
    release(loader)

    assert len(reference) > k + 2
    resumed = first + rest
    assert len(resumed) == len(reference)
    for got, want in zip(resumed, reference, strict=True):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[key], want[key]) for key in want)
    # shuffling did reorder the data
    plain = build(cfg_for(folder, split="train", shuffle=False), data["tok"], mode, seq, batch)
    unshuffled = collect(plain, limit=1)
    release(plain)
    assert not torch.equal(unshuffled[0]["input_ids"], reference[0]["input_ids"])


def test_subset_size_draws_the_same_samples_every_epoch(data: dict[str, str]) -> None:
    folder = os.path.join(data["root"], "pre")
    loader = build(cfg_for(folder, split="train", subset_size=10, drop_last=False), data["tok"], batch=2)
    epochs = [
        sorted(map(tuple, torch.cat([b["input_ids"] for b in collect(loader)]).tolist())) for _ in range(2)
    ]
    release(loader)
    assert len(epochs[0]) == 10 and epochs[0] == epochs[1]
    every = {tuple(s["tokens"].tolist()) for s in raw_samples(os.path.join(folder, "train"))}
    assert set(epochs[0]) <= every and len(every) > 10


def test_remote_path_downloads_into_local_cache(data: dict[str, str], tmp_path: Path) -> None:
    remote = os.path.join(data["root"], "pre")
    cfg = LoaderConfig(
        remote=remote, local=str(tmp_path / "cache"), split="val", shuffle=False, num_workers=0
    )
    loader = build(cfg, data["tok"])
    got = torch.cat([b["input_ids"] for b in collect(loader)])
    release(loader)
    expected = [s["tokens"].tolist() for s in raw_samples(os.path.join(remote, "val"))]
    assert got.tolist() == expected[: len(got)]
    assert (tmp_path / "cache" / "val" / "index.json").is_file()


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("missing", r"no shard folder .*nowhere: convert data there with `composer-dlm-convert"),
        ("empty", r"shard folder .*empty is empty or holds no MDS index"),
        ("bad_split", r"no split 'validation' in .*pre \(it has train, val\); set the loader's split"),
        ("no_split", r"pre holds splits \(train, val\), not shards; set the loader's split"),
        (
            "split_folder",
            r"pre/train is itself a split folder \(shards and index.json\) and has no 'train' inside; set the "
            r"loader's local to .*/pre, the folder composer-dlm-convert --out wrote \(its split 'train' is then read "
            r"from .*/pre/train\)",
        ),
        (
            "no_val",
            r"no split 'val' in .*sft \(it has train\); convert again with --val-fraction \(e.g. 0.01\) to hold "
            r"some data out for evaluation, or set eval_loader.split to one of them",
        ),
        ("seq_len", r"sequences of 16 tokens, the run's max_seq_len is 32; reconvert with --seq-len 32"),
        ("sft_seq_len", r"SFT examples are up to 160 tokens, longer than the run's max_seq_len 32"),
        ("mode", r"shards are for 'pretrain', the run wants 'sft'"),
        ("tokenizer", r"shards were tokenised with .*tok.*vocab 300.*the run uses .*other_tok.*vocab 280"),
        ("no_manifest", r"has MDS shards but no manifest.json"),
        ("subset", r"subset_size 1000 is more than the \d+ samples there"),
        ("remote", r"could not fetch .*nowhere/train/manifest.json"),
    ],
)
def test_loader_errors_name_the_path_and_the_fix(
    data: dict[str, str], tmp_path: Path, case: str, pattern: str
) -> None:
    pre = os.path.join(data["root"], "pre")
    tok, mode, seq, kw = data["tok"], "pretrain", SEQ, {"split": "train"}
    local = pre
    if case == "missing":
        local = str(tmp_path / "nowhere")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        local, kw = str(tmp_path / "empty"), {}
    elif case == "bad_split":
        kw = {"split": "validation"}
    elif case == "no_split":
        kw = {}
    elif case == "split_folder":  # the split's own folder given as local (the split is appended to it)
        local = os.path.join(pre, "train")
    elif case == "no_val":  # converted without --val-fraction
        local, mode, seq, kw = os.path.join(data["root"], "sft"), "sft", SFT_SEQ, {"split": "val"}
    elif case == "seq_len":
        seq = 32
    elif case == "sft_seq_len":
        local, mode, seq = os.path.join(data["root"], "sft"), "sft", 32
    elif case == "mode":
        mode = "sft"
    elif case == "tokenizer":
        tok = data["other_tok"]
    elif case == "no_manifest":
        shutil.copytree(os.path.join(pre, "train"), tmp_path / "copy" / "train")
        (tmp_path / "copy" / "train" / "manifest.json").unlink()
        local = str(tmp_path / "copy")
    elif case == "subset":
        kw = {"split": "train", "subset_size": 1000}
    elif case == "remote":
        cfg = LoaderConfig(remote=str(tmp_path / "nowhere"), local=str(tmp_path / "cache"), split="train")
        with pytest.raises(DataError, match=pattern):
            build(cfg, tok, mode, seq)
        return
    with pytest.raises(DataError, match=pattern):
        build(cfg_for(local, **kw), tok, mode, seq)


def _die_holding_shared_memory(remote: str, local: str) -> None:
    StreamingDataset(remote=remote, local=local, split="train", batch_size=2)
    os._exit(0)  # killed: no destructor, no cleanup


def _streaming_blocks() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if re.fullmatch(r"\d{6}_\w+", name)}


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm to list shared memory")
def test_stale_shared_memory_of_a_killed_run_is_cleaned_and_live_runs_kept(
    data: dict[str, str], tmp_path: Path
) -> None:
    pre = os.path.join(data["root"], "pre")
    live = build(cfg_for(pre, split="val", shuffle=False), data["tok"])  # a live loader of this process
    first = collect(live, limit=1)[0]["input_ids"]
    live_blocks = {n for n in _streaming_blocks() if n.startswith(f"{live.dataset._shm_prefix_int:06}_")}
    assert live_blocks
    remote, local = pre, str(tmp_path / "cache")
    before = _streaming_blocks()
    assert run_spawned(_die_holding_shared_memory, [(remote, local)]) == [0]
    leaked = _streaming_blocks() - before
    assert any(name.endswith("_locals") for name in leaked)  # the killed run registered its folder

    loader = build(LoaderConfig(remote=remote, local=local, split="train", num_workers=0), data["tok"])
    assert next(iter(loader))["input_ids"].shape == (4, SEQ)
    ours = f"{loader.dataset._shm_prefix_int:06}_"
    remaining = _streaming_blocks()
    assert live_blocks <= remaining  # the live loader's blocks were kept ...
    assert all(n not in remaining or n.startswith(ours) for n in leaked)  # ... the killed run's removed
    assert torch.equal(collect(live, limit=1)[0]["input_ids"], first)  # and the live loader still works
    release(loader)
    release(live)


def test_a_second_loader_leaves_the_first_working(data: dict[str, str]) -> None:
    from composer_dlm.data.shm import clean_stale_shared_memory

    folder = os.path.join(data["root"], "pre")
    train = build(cfg_for(folder, split="train", shuffle=False), data["tok"])
    first = next(iter(train))["input_ids"]
    prefix = f"{train.dataset._shm_prefix_int:06}_"
    assert not [n for n in clean_stale_shared_memory() if n.startswith(prefix)]  # live blocks are kept
    val = build(cfg_for(folder, split="val", shuffle=False), data["tok"])
    assert len(collect(val)) == len(val)
    again = collect(train)
    assert torch.equal(again[0]["input_ids"], first) and len(again) == len(train)
    release(train)
    release(val)


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({}, r"set `local`"),
        ({"local": "embedded", "remote": "s3://b/x"}, r"leave `remote` unset"),
        ({"local": "x", "pad_to": "left"}, r"pad_to must be one of"),
        ({"local": "x", "subset_size": 0}, r"subset_size must be positive"),
        ({"local": "x", "num_workers": -1}, r"num_workers must be >= 0"),
        ({"local": "x", "num_workers": 0, "prefetch_factor": 2}, r"prefetch_factor needs num_workers > 0"),
        ({"local": "x", "shuffle_algo": "py3"}, r"shuffle_algo must be one of"),
        ({"local": "x", "shuffle_seed": -1}, r"shuffle_seed must be >= 0"),
    ],
)
def test_loader_config_rejects_bad_values(kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        LoaderConfig(**kw)


def test_loader_config_works_as_an_omegaconf_schema() -> None:
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(LoaderConfig(local="x"))
    merged = OmegaConf.merge(
        schema, {"local": "embedded", "split": "val", "subset_size": 8, "shuffle": False}
    )
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, LoaderConfig) and cfg.subset_size == 8 and cfg.local == "embedded"
    with pytest.raises(ValueError, match="pad_to"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"pad_to": "left"}))
