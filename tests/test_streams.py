"""Mixtures (`train_loader.streams`): per-stream counts by proportion / repeat / choose, exact mid-epoch
resumption across streams, manifests checked per stream, the YAML schema, and the counts in a real run's log.

References: the samples of each folder read with Streaming itself (which stream a batch row came from is
found by its tokens), counts computed by hand from the folder sizes, and an uninterrupted epoch.
"""

from __future__ import annotations

import gc
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from streaming import LocalDataset
from tiny_runs import fit_recording_batches, tiny_run_overrides

from composer_dlm.config import ConfigError, build
from composer_dlm.data import (
    ConvertConfig,
    DataError,
    LoaderConfig,
    build_dataloader,
    convert,
    load_tokenizer,
)
from composer_dlm.data.config import StreamConfig
from composer_dlm.data.tokenizer import train_bpe_tokenizer

SEQ = 16
WORDS = "streams mix several corpora into one epoch with weights chosen per source".split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) + f" {seed}" for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("streams")
    train_bpe_tokenizer(sentences(80, 0), vocab_size=300).save_pretrained(str(root / "tok"))
    for name, n, seed in (("web", 60, 1), ("code", 25, 2)):
        src = root / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(n, seed)))
        convert(
            ConvertConfig(
                inputs=[str(src)],
                out=str(root / name),
                tokenizer=str(root / "tok"),
                seq_len=SEQ,
                progress=False,
            )
        )
    convert(
        ConvertConfig(
            inputs=[str(root / "web.jsonl")],
            out=str(root / "long"),
            tokenizer=str(root / "tok"),
            seq_len=32,
            progress=False,
        )
    )
    return {"root": str(root), "tok": str(root / "tok")}


def rows(folder: str) -> set[tuple[int, ...]]:
    ds = LocalDataset(folder)  # Streaming's reader without shared memory (no descriptors left open)
    return {tuple(ds[i]["tokens"].tolist()) for i in range(len(ds))}


def mixture(data: dict[str, str], **weights: dict) -> LoaderConfig:
    streams = {name: StreamConfig(local=f"{data['root']}/{name}", **w) for name, w in weights.items()}
    return LoaderConfig(
        streams=streams, split="train", num_workers=0, persistent_workers=False, shuffle_seed=5
    )


def loader_for(cfg: LoaderConfig, data: dict[str, str], batch: int = 4):
    return build_dataloader(
        cfg, tokenizer=load_tokenizer(data["tok"]), mode="pretrain", max_seq_len=SEQ, device_batch_size=batch
    )


def epoch(loader, limit: int | None = None) -> list[torch.Tensor]:
    out = []
    for b in loader:
        out.append(b["input_ids"])
        if limit is not None and len(out) == limit:
            break
    return out


def release(loader) -> None:
    ds = loader.dataset
    if hasattr(ds, "_iterator"):
        ds._iterator.non_blocking_exit()
    if hasattr(ds, "_executor"):
        ds._executor.shutdown(wait=True)
    gc.collect()


def split_3_1(n: dict[str, int]) -> dict[str, int]:
    """An epoch of all samples on disk split 3:1, rounded down (Streaming gives what is left over to a stream
    drawn by its seed)."""
    total = n["web"] + n["code"]
    return {"web": total * 3 // 4, "code": total // 4}


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        (
            {"web": {"repeat": 0.5}, "code": {"repeat": 2.0}},
            lambda n: {"web": n["web"] // 2, "code": 2 * n["code"]},
        ),
        ({"web": {"choose": 10}, "code": {}}, lambda n: {"web": 10, "code": n["code"]}),
        ({"web": {"proportion": 3.0}, "code": {"proportion": 1.0}}, split_3_1),
    ],
)
def test_each_stream_gives_its_share(data: dict[str, str], weights: dict, expected: Callable) -> None:
    web, code = rows(f"{data['root']}/web/train"), rows(f"{data['root']}/code/train")
    on_disk = {"web": len(web), "code": len(code)}
    want = expected(on_disk)
    cfg = mixture(data, **weights)
    cfg.drop_last = False
    loader = loader_for(cfg, data, batch=1)
    got = [tuple(r.tolist()) for b in epoch(loader) for r in b]
    counts = loader.dataset.stream_counts
    release(loader)
    drawn = {"web": sum(r in web for r in got), "code": sum(r in code for r in got)}
    if "proportion" in weights["web"]:  # the floors, and the one left over to either stream
        total = on_disk["web"] + on_disk["code"]
        assert sum(want.values()) == total - 1
        assert sum(drawn.values()) == total and all(drawn[n] - want[n] in (0, 1) for n in want)
    else:
        assert drawn == want
    assert len(got) == sum(drawn.values())
    assert counts == [{"stream": n, "samples": on_disk[n], "per_epoch": drawn[n]} for n in ("web", "code")]


def test_mid_epoch_resume_across_a_mixture_is_exact(data: dict[str, str]) -> None:
    cfg = mixture(data, web={"proportion": 2.0}, code={"proportion": 1.0})
    loader = loader_for(cfg, data)
    reference = epoch(loader)
    release(loader)
    k = 4
    loader = loader_for(cfg, data)
    first = epoch(loader, limit=k)
    state = loader.dataset.state_dict(num_samples=k * 4, from_beginning=True)  # what Composer saves
    release(loader)
    loader = loader_for(cfg, data)
    loader.dataset.load_state_dict(state)
    rest = epoch(loader)
    release(loader)
    assert len(reference) > k + 3 and len(first) + len(rest) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(first + rest, reference, strict=True))
    code = rows(f"{data['root']}/code/train")
    assert any(tuple(r.tolist()) in code for b in rest for r in b)  # both streams really are mixed in


def test_manifests_are_checked_per_stream(data: dict[str, str]) -> None:
    root = data["root"]
    cfg = LoaderConfig(
        streams={"web": StreamConfig(local=f"{root}/web"), "long": StreamConfig(local=f"{root}/long")},
        split="train",
    )
    with pytest.raises(
        DataError, match=r"stream 'long' \(.*long/train\): shards hold sequences of 32 tokens"
    ):
        loader_for(cfg, data)
    cfg = LoaderConfig(streams={"web": StreamConfig(local=f"{root}/web", split="nope")}, split="train")
    with pytest.raises(DataError, match=r"no split 'nope' in .*web \(it has train\)"):
        loader_for(cfg, data)


def test_yaml_schema_of_streams() -> None:
    section = {
        "streams": {"a": {"local": "/x", "proportion": 0.7}, "b": {"remote": "s3://b/y", "proportion": 0.3}},
        "split": "train",
    }
    cfg = build(LoaderConfig, section, "train_loader")
    assert isinstance(cfg.streams["b"], StreamConfig) and cfg.streams["b"].remote == "s3://b/y"
    for bad, message in [
        (
            {"streams": {"a": {"local": "/x", "propotion": 1}}},
            "unknown key 'train_loader.streams.a.propotion'; did you mean 'proportion'?",
        ),
        (
            {"streams": {"a": {"local": "/x", "repeat": 2, "choose": 3}}},
            "set at most one of proportion, repeat, choose",
        ),
        (
            {"streams": {"a": {"local": "/x", "proportion": 1}, "b": {"local": "/y"}}},
            "streams a set `proportion` but b do not",
        ),
        (
            {"local": "/x", "streams": {"a": {"local": "/y"}}},
            "set either `streams` (a mixture) or `local`/`remote`",
        ),
        ({"streams": {}}, "`streams` is empty"),
        ({"streams": {"a": {"local": "/x", "choose": 5}}, "subset_size": 3}, "streams a set repeat/choose"),
    ]:
        with pytest.raises(ConfigError) as info:
            build(LoaderConfig, bad, "train_loader")
        assert message in str(info.value), info.value


def fit(data: dict[str, str], base: Path, run: str, duration: str) -> tuple[list[torch.Tensor], Path]:
    overrides = tiny_run_overrides(base, run, data["tok"], duration, SEQ) + [
        "train_loader.local=null",
        f"train_loader.streams.web.local={data['root']}/web",
        "train_loader.streams.web.repeat=0.5",
        f"train_loader.streams.code.local={data['root']}/code",
    ]
    batches, cfg = fit_recording_batches(overrides)
    return batches, cfg.run_folder


def test_a_run_on_a_mixture_resumes_exactly_and_logs_stream_counts(
    data: dict[str, str], tmp_path: Path
) -> None:
    """Composer's own checkpoint/resume: 2 batches, stop, resume to 5 == 5 uninterrupted batches (mid-epoch)."""
    whole, _ = fit(data, tmp_path, "whole", "5ba")
    first, run = fit(data, tmp_path, "parts", "2ba")
    rest, _ = fit(data, tmp_path, "parts", "5ba")
    web, code = rows(f"{data['root']}/web/train"), rows(f"{data['root']}/code/train")
    assert (len(web) // 2 + len(code)) // 4 > 5  # 5 batches end mid-epoch
    assert len(first) == 2 and len(rest) == 3
    assert all(torch.equal(a, b) for a, b in zip(first + rest, whole, strict=True))
    log = "\n".join(p.read_text() for p in run.rglob("*.txt"))
    assert f"train_loader/streams/web/samples_per_epoch: {len(web) // 2}" in log
    assert f"train_loader/streams/code/samples: {len(code)}" in log
