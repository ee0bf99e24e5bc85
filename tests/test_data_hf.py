"""Conversion from Hugging Face datasets (`--hf-dataset`): packaged loaders over local files, save_to_disk
folders and a hub id served from an offline cache laid out here. Nothing is downloaded.

Reference: the same records converted from JSONL files by the file reader, whose output test_data_convert.py
checks against hand-computed packing and chat splits. Equal shards mean the dataset path feeds the same
records, in the same order, through the same pretrain / SFT / chat modes and manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from streaming import LocalDataset

from composer_dlm.data import ConvertConfig, DataError, Fields, convert
from composer_dlm.data.sources import HFDataset
from composer_dlm.data.tokenizer import train_bpe_tokenizer

datasets = pytest.importorskip("datasets", reason="the hf extra (pip install -e '.[hf]')")

WORDS = "a masked diffusion model predicts hidden tokens of text all at once then unmasks".split()


def docs(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 9)) + f" ({i})" for i in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("hf_tok") / "tok"
    train_bpe_tokenizer(docs(60), vocab_size=320).save_pretrained(str(path))  # BOS, EOS, mask, chat template
    return str(path)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def samples(folder: Path) -> list[dict]:
    ds = LocalDataset(str(folder))  # Streaming's reader without shared memory (no descriptors left open)
    return [{k: v.tolist() for k, v in ds[i].items()} for i in range(len(ds))]


def run(out: Path, tok: str, *, inputs: list[Path] | None = None, hf: HFDataset | None = None, **kw) -> Path:
    convert(
        ConvertConfig(
            inputs=[str(p) for p in inputs or []],
            out=str(out),
            tokenizer=tok,
            progress=False,
            hf_dataset=hf,
            **kw,
        )
    )
    return out


def test_json_and_parquet_loaders_give_the_file_readers_shards(tmp_path: Path, tok: str) -> None:
    rows = [{"body": d, "id": i} for i, d in enumerate(docs(40))]
    src = jsonl(tmp_path / "d.jsonl", rows)
    kw = {"seq_len": 16, "fields": Fields(text="body"), "val_fraction": 0.25}
    want = run(tmp_path / "files", tok, inputs=[src], **kw)
    got = run(tmp_path / "json", tok, hf=HFDataset("json", data_files=[str(src)]), **kw)
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    got_pq = run(tmp_path / "parquet", tok, hf=HFDataset("parquet", data_files=[str(parquet)]), **kw)
    for split in ("train", "val"):
        reference = samples(want / split)
        assert len(reference) > 3
        assert samples(got / split) == reference and samples(got_pq / split) == reference
    manifest = json.loads((got / "train" / "manifest.json").read_text())
    assert manifest["inputs"] == ["json[train]", "d.jsonl"] and manifest["mode"] == "pretrain"
    assert manifest["counts"] == json.loads((want / "train" / "manifest.json").read_text())["counts"]


def test_save_to_disk_folder_sft_pairs_and_chat(tmp_path: Path, tok: str) -> None:
    pairs = [{"q": f"question {i}?", "a": d} for i, d in enumerate(docs(12))]
    chats = [
        {"messages": [{"role": "user", "content": p["q"]}, {"role": "assistant", "content": p["a"]}]}
        for p in pairs
    ]
    fields = Fields(prompt="q", response="a")
    want_pairs = run(
        tmp_path / "f1",
        tok,
        inputs=[jsonl(tmp_path / "p.jsonl", pairs)],
        mode="sft",
        seq_len=64,
        fields=fields,
    )
    want_chat = run(tmp_path / "f2", tok, inputs=[jsonl(tmp_path / "c.jsonl", chats)], mode="sft", seq_len=64)

    disk = tmp_path / "disk"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(chats[:3]), "test": datasets.Dataset.from_list(chats)}
    ).save_to_disk(str(disk))
    got_chat = run(tmp_path / "h2", tok, hf=HFDataset(str(disk), split="test"), mode="sft", seq_len=64)
    assert samples(got_chat / "train") == samples(want_chat / "train")

    single = tmp_path / "single"
    datasets.Dataset.from_list(pairs).save_to_disk(str(single))
    got_pairs = run(tmp_path / "h1", tok, hf=HFDataset(str(single)), mode="sft", seq_len=64, fields=fields)
    assert samples(got_pairs / "train") == samples(want_pairs / "train")
    assert len(samples(want_pairs / "train")) == 12

    with pytest.raises(DataError, match=r"no split 'validation' \(it has train, test\); pass --hf-split"):
        run(tmp_path / "x", tok, hf=HFDataset(str(disk), split="validation"), mode="sft", seq_len=64)


def test_hub_id_from_an_offline_cache(tmp_path: Path, tok: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`acme/tiny-docs`, config 'default', as the datasets cache holds a dataset prepared once online:
    <HF_DATASETS_CACHE>/acme___tiny-docs/default/0.0.0/<hash>/ with dataset_info.json and Arrow stream files."""
    texts = docs(30)
    table = datasets.Dataset.from_dict({"text": texts}).data.table
    cache = tmp_path / "cache"
    folder = cache / "acme___tiny-docs" / "default" / "0.0.0" / "0123abcd"
    folder.mkdir(parents=True)
    with pa.OSFile(str(folder / "tiny-docs-train.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    split = datasets.SplitInfo(name="train", num_examples=len(texts), dataset_name="tiny-docs")
    datasets.DatasetInfo(
        features=datasets.Features({"text": datasets.Value("string")}),
        dataset_name="tiny-docs",
        config_name="default",
        splits=datasets.SplitDict({"train": split}),
    ).write_to_directory(str(folder))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)

    want = run(
        tmp_path / "files",
        tok,
        inputs=[jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])],
        seq_len=16,
    )
    got = run(tmp_path / "hub", tok, hf=HFDataset("acme/tiny-docs", config="default"), seq_len=16)
    assert samples(got / "train") == samples(want / "train")

    with pytest.raises(
        DataError, match=r"Hugging Face dataset acme/absent\[train\]: .*check the name, --hf-config"
    ):
        run(tmp_path / "x", tok, hf=HFDataset("acme/absent"), seq_len=16)
    assert not (tmp_path / "x").exists()


def test_cli_flags_and_errors(tmp_path: Path, tok: str, capsys: pytest.CaptureFixture[str]) -> None:
    """scripts/convert_to_mds.py's --hf-* flags (in this process: the CLI parsing, not a second torch import)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_to_mds", Path(__file__).parents[1] / "scripts" / "convert_to_mds.py"
    )
    assert spec and spec.loader
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src = jsonl(tmp_path / "d.jsonl", [{"t": d} for d in docs(30)])
    base = ["--tokenizer", tok, "--seq-len", "16", "--no-progress"]
    flags = ["--hf-dataset", "json", "--hf-data-files", str(src), "--hf-split", "train", "--text-field", "t"]
    assert cli.main([*base, *flags, "--out", str(tmp_path / "o")]) == 0
    assert "pretrain shards of seq_len 16" in capsys.readouterr().out
    reference = run(tmp_path / "ref", tok, inputs=[src], seq_len=16, fields=Fields(text="t"))
    assert samples(tmp_path / "o" / "train") == samples(reference / "train")
    for extra, message in [
        ([str(src), "--hf-dataset", "json"], f"give input files ({src}) or --hf-dataset json, not both"),
        ([], "convert_to_mds.py: give INPUT files or folders, or --hf-dataset NAME"),
        (["--hf-dataset", str(tmp_path)], f"{tmp_path}: not a dataset folder written by save_to_disk"),
    ]:
        with pytest.raises(SystemExit) as info:
            cli.main([*base, *extra, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith(f"composer-dlm: error: {message}"), err
        assert err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
