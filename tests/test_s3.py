"""Object storage for real: an S3 server (moto's server mode, on 127.0.0.1 only, stopped after the module)
receives shards from `convert --out s3://...` through Streaming's writer, and a Composer run trains from
`remote: s3://...` with a local cache, is stopped mid-epoch and resumed with the cache deleted in between.

Reference: the shards converted to a local folder (same input, same tokenizer), and an uninterrupted run
over the same remote, whose batches the interrupted-and-resumed run must repeat exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from faults import free_port
from streaming import LocalDataset
from tiny_runs import fit_recording_batches, tiny_run_overrides

from composer_dlm.data import (
    ConvertConfig,
    DataError,
    LoaderConfig,
    build_dataloader,
    convert,
    load_tokenizer,
)
from composer_dlm.data.tokenizer import train_bpe_tokenizer

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

SEQ = 16
BUCKET = "dlm-data"
WORDS = "object storage holds the shards and every run streams them into a local cache".split()


def texts(n: int) -> list[str]:
    return [" ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(4 + i % 11)) for i in range(n)]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server on a free loopback port, with fake credentials only in this process's environment."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    patch = pytest.MonkeyPatch()
    for key, value in {
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        patch.setenv(key, value)
    patch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    root = tmp_path_factory.mktemp("s3")
    train_bpe_tokenizer(texts(50), vocab_size=300).save_pretrained(str(root / "tok"))
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(120)))
    yield {"client": client, "root": root, "tok": str(root / "tok"), "src": str(src)}
    patch.undo()
    server.stop()


def read(folder: str) -> list[list[int]]:
    ds = LocalDataset(folder)  # Streaming's reader without shared memory (no descriptors left open)
    return [ds[i]["tokens"].tolist() for i in range(len(ds))]


def test_convert_uploads_through_streamings_writer(s3) -> None:
    common = {
        "inputs": [s3["src"]],
        "tokenizer": s3["tok"],
        "seq_len": SEQ,
        "val_fraction": 0.1,
        "progress": False,
    }
    convert(ConvertConfig(out=f"s3://{BUCKET}/docs", **common))
    convert(ConvertConfig(out=str(s3["root"] / "local"), **common))
    keys = sorted(o["Key"] for o in s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="docs/")["Contents"])
    local = sorted(
        f"docs/{p.relative_to(s3['root'] / 'local')}"
        for p in (s3["root"] / "local").rglob("*")
        if p.is_file()
    )
    assert keys == local and "docs/train/manifest.json" in keys and "docs/val/index.json" in keys

    # A loader reads the bucket into a fresh cache and yields exactly the locally converted samples.
    cfg = LoaderConfig(
        remote=f"s3://{BUCKET}/docs",
        local=str(s3["root"] / "cache"),
        split="train",
        shuffle=False,
        num_workers=0,
        drop_last=False,
    )
    loader = build_dataloader(
        cfg, tokenizer=load_tokenizer(s3["tok"]), mode="pretrain", max_seq_len=SEQ, device_batch_size=4
    )
    got = torch.cat([b["input_ids"] for b in loader]).tolist()
    assert got == read(str(s3["root"] / "local" / "train"))
    assert (s3["root"] / "cache" / "train" / "manifest.json").is_file() or (
        s3["root"] / "cache" / "train" / "index.json"
    ).is_file()

    with pytest.raises(
        DataError, match=rf"output s3://{BUCKET}/docs already holds {len(keys)} files .*pass --overwrite"
    ):
        convert(ConvertConfig(out=f"s3://{BUCKET}/docs", **common))
    with pytest.raises(
        DataError, match=r"cannot write to s3://no-such-bucket/x \(ClientError.*check that the bucket"
    ):
        convert(ConvertConfig(out="s3://no-such-bucket/x", **common))
    with pytest.raises(DataError, match=rf"could not fetch s3://{BUCKET}/nothing/train/manifest.json"):
        build_dataloader(
            LoaderConfig(
                remote=f"s3://{BUCKET}/nothing", local=str(s3["root"] / "c2"), split="train", num_workers=0
            ),
            tokenizer=load_tokenizer(s3["tok"]),
            mode="pretrain",
            max_seq_len=SEQ,
            device_batch_size=4,
        )


def train(s3, base: Path, run: str, duration: str, cache: Path) -> list[torch.Tensor]:
    overrides = tiny_run_overrides(base, run, s3["tok"], duration, SEQ) + [
        f"train_loader.remote=s3://{BUCKET}/run",
        f"train_loader.local={cache}",
        "train_loader.split=train",
    ]
    return fit_recording_batches(overrides)[0]


def test_train_from_s3_stop_mid_epoch_and_resume_with_a_fresh_cache(s3, tmp_path: Path) -> None:
    convert(
        ConvertConfig(
            inputs=[s3["src"]], out=f"s3://{BUCKET}/run", tokenizer=s3["tok"], seq_len=SEQ, progress=False
        )
    )
    reference = train(s3, tmp_path, "whole", "5ba", tmp_path / "cache-whole")

    first = train(s3, tmp_path, "parts", "2ba", tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache")  # the resumed run downloads again from the bucket
    rest = train(s3, tmp_path, "parts", "5ba", tmp_path / "cache")

    epoch_batches = remote_batches(s3)
    assert epoch_batches > 5  # 5 batches are mid-epoch
    assert len(first) == 2 and len(rest) == 3
    assert all(torch.equal(a, b) for a, b in zip(first + rest, reference, strict=True))
    assert (tmp_path / "cache" / "train" / "index.json").is_file()


def remote_batches(s3) -> int:
    """The number of full batches of 4 in the bucket's training split (from its manifest's sample count)."""
    body = s3["client"].get_object(Bucket=BUCKET, Key="run/train/manifest.json")["Body"].read()
    return json.loads(body)["counts"]["samples"] // 4


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_two_processes_train_on_a_mixture_from_s3_killed_and_resumed_with_a_fresh_cache(
    s3, tmp_path: Path
) -> None:
    """The user's path for issue 18 with `composer -n 2`: one stream in the bucket, one on local disk; the run is
    SIGKILLed (launcher and both ranks) after 3 batches, its cache deleted, and restarted: every batch's loss and the
    final weights equal an uninterrupted two-process run's, and both ranks log the per-stream counts."""
    from faults import kill_after_batches, launch_ranks, rank0_metrics, rank0_metrics_by_attempt, run_ranks
    from test_multiprocess import ENV, QUICKSTART, STEPS, TRAIN, final_weights

    convert(
        ConvertConfig(
            inputs=[s3["src"]], out=f"s3://{BUCKET}/mp", tokenizer=s3["tok"], seq_len=SEQ, progress=False
        )
    )
    convert(
        ConvertConfig(
            inputs=[s3["src"]], out=str(tmp_path / "disk"), tokenizer=s3["tok"], seq_len=SEQ, progress=False
        )
    )

    def args(base: Path) -> list[str]:
        return tiny_run_overrides(base, "mix", s3["tok"], f"{STEPS}ba", SEQ) + [
            "device_train_microbatch_size=2",  # 4 sequences a batch over 2 processes
            "logging.console_interval=1ba",
            "train_loader.local=null",
            "train_loader.split=train",
            f"train_loader.streams.bucket.remote=s3://{BUCKET}/mp",
            f"train_loader.streams.bucket.local={base / 'cache'}",
            f"train_loader.streams.disk.local={tmp_path / 'disk'}",
            "train_loader.streams.disk.repeat=0.5",
        ]

    run_ranks(2, [TRAIN, QUICKSTART, *args(tmp_path / "ref")], ENV)

    base = tmp_path / "killed"
    p = launch_ranks(2, [TRAIN, QUICKSTART, *args(base)], ENV)
    kill_after_batches(p, 3, group=True)  # after the checkpoint at batch 2
    shutil.rmtree(base / "cache")  # the restart downloads again from the bucket
    run_ranks(2, [TRAIN, QUICKSTART, *args(base)], ENV)

    _first, restart = rank0_metrics_by_attempt(base / "mix", "loss/train/total")
    assert sorted(restart) == list(range(2, STEPS))  # the restart resumed from the batch-2 checkpoint
    assert (base / "cache" / "train" / "index.json").is_file()  # and filled the deleted cache from the bucket
    ref_w, got_w = final_weights(tmp_path / "ref" / "mix"), final_weights(base / "mix")
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        assert torch.equal(ref_w[name], got_w[name]), name
    ref_loss = rank0_metrics(tmp_path / "ref" / "mix", "loss/train/total")
    assert (
        sorted(ref_loss) == list(range(STEPS)) and rank0_metrics(base / "mix", "loss/train/total") == ref_loss
    )
    for rank in (0, 1):
        (log,) = sorted((tmp_path / "ref" / "mix" / "logs").glob(f"rank{rank}-*.txt"))
        text = log.read_text()
        assert "train_loader/streams/bucket/samples_per_epoch" in text
        assert "train_loader/streams/disk/samples_per_epoch" in text
