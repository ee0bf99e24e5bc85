"""Conversion to MDS: round trips, the prompt/answer split, counts, splits, errors and atomicity.

Corpora and tokenizers are made here (tiny byte-level BPE, trained in milliseconds); nothing is
downloaded. Expected values come from the input text and the chat format written out by hand.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faults import run_spawned, spawned_children
from streaming import LocalDataset, StreamingDataset

from composer_dlm.data import ConvertConfig, DataError, Fields, LoaderConfig, build_dataloader, convert
from composer_dlm.data.tokenizer import train_bpe_tokenizer

WORDS = (
    "the model reads masked tokens and predicts every one of them at once while a schedule decides how "
    "many positions stay hidden during training so that sampling can unmask text step by step"
).split()
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 40))]
        extra = " café, naïve — 中文 ✓" if i % 3 == 0 else ""
        docs.append(
            f"Document {i}: " + " ".join(words) + "." + extra + ("\n\nSecond paragraph." if i % 2 else "")
        )
    return docs


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tokenizer folders: 'chat' (BOS, EOS, mask, chat template), 'plain' (EOS, mask only), 'no_eos'."""
    root = tmp_path_factory.mktemp("tokenizers")
    texts = make_docs(200, seed=1)
    variants = {"chat": {}, "plain": {"bos": False, "chat": False}, "no_eos": {"eos": False}}
    paths = {}
    for name, flags in variants.items():
        train_bpe_tokenizer(texts, vocab_size=400, **flags).save_pretrained(str(root / name))
        paths[name] = str(root / name)
    return paths


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_split(folder: Path) -> list[dict]:
    """Every sample of an MDS split, in order, read with Streaming's own reader: LocalDataset (no shared memory,
    so no descriptors stay open across the many conversions of this module), or StreamingDataset where the
    shards are compressed (it decompresses them; LocalDataset does not)."""
    shards = json.loads((folder / "index.json").read_text())["shards"]
    if any(shard.get("compression") for shard in shards):
        streaming = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
        return [streaming[i] for i in range(streaming.num_samples)]
    ds = LocalDataset(str(folder))
    return [ds[i] for i in range(len(ds))]


def run(tmp_path: Path, inputs: list[Path], tokenizer: str, **kwargs) -> tuple[Path, object]:
    out = tmp_path / "out"
    cfg = ConvertConfig(
        inputs=[str(p) for p in inputs], out=str(out), tokenizer=tokenizer, progress=False, **kwargs
    )
    return out, convert(cfg)


def load(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- pretraining


def test_pretrain_round_trip_and_packing(tmp_path: Path, tokenizers: dict[str, str]) -> None:
    docs = make_docs(30)
    src = write_jsonl(tmp_path / "docs.jsonl", [{"body": d} for d in docs])
    seq_len = 48
    out, summary = run(tmp_path, [src], tokenizers["chat"], seq_len=seq_len, fields=Fields(text="body"))
    tok = load(tokenizers["chat"])
    samples = read_split(out / "train")
    assert all(s["tokens"].dtype == np.uint32 and s["tokens"].shape == (seq_len,) for s in samples)
    written = np.concatenate([s["tokens"] for s in samples]).tolist()

    # Reference packing: [BOS] ids [EOS] per document, concatenated, cut into full sequences.
    expected_ids = [
        i
        for d in docs
        for i in [tok.bos_token_id, *tok.encode(d, add_special_tokens=False), tok.eos_token_id]
    ]
    num_seq = len(expected_ids) // seq_len
    assert written == expected_ids[: num_seq * seq_len]

    # Decoding gives back the input text: everything up to the dropped tail, special tokens included.
    full_text = "".join(f"{BOS}{d}{EOS}" for d in docs)
    decoded = tok.decode(written)
    assert full_text.startswith(decoded)
    assert len(decoded) > len(full_text) - len(docs[-1]) - len(BOS + EOS) - 2 * seq_len

    counts = summary.splits["train"]
    assert (counts.documents, counts.samples, counts.tokens) == (30, num_seq, num_seq * seq_len)
    assert counts.dropped_tokens == len(expected_ids) - num_seq * seq_len
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["mode"] == "pretrain" and manifest["seq_len"] == seq_len
    assert manifest["counts"]["samples"] == num_seq
    assert manifest["tokenizer"]["eos_token_id"] == tok.eos_token_id


def test_folder_of_text_jsonl_parquet_in_sorted_order(tmp_path: Path, tokenizers: dict[str, str]) -> None:
    docs = make_docs(6)
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(docs[0], encoding="utf-8")
    write_jsonl(folder / "b.jsonl", [{"text": docs[1]}, {"text": docs[2]}])
    pq.write_table(pa.table({"text": docs[3:5]}), folder / "c.parquet")
    (folder / "sub" / "d.md").write_text(docs[5], encoding="utf-8")
    (folder / ".hidden.txt").write_text("not me", encoding="utf-8")
    (folder / "notes.csv").write_text("skipped", encoding="utf-8")
    out, summary = run(tmp_path, [folder], tokenizers["plain"], seq_len=16)
    tok = load(tokenizers["plain"])
    decoded = tok.decode(np.concatenate([s["tokens"] for s in read_split(out / "train")]).tolist())
    full_text = "".join(f"{d}{EOS}" for d in docs)  # this tokenizer has no BOS
    assert full_text.startswith(decoded) and len(decoded) > len(full_text) - 40
    assert summary.splits["train"].documents == 6


def test_val_split_takes_evenly_spaced_records(tmp_path: Path, tokenizers: dict[str, str]) -> None:
    docs = make_docs(8)
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    out, summary = run(tmp_path, [src], tokenizers["chat"], seq_len=8, val_fraction=0.25)
    # floor((i + 1) / 4) > floor(i / 4) for i = 3 and 7
    assert summary.splits["val"].documents == 2 and summary.splits["train"].documents == 6
    tok = load(tokenizers["chat"])
    val_text = tok.decode(np.concatenate([s["tokens"] for s in read_split(out / "val")]).tolist())
    assert f"{BOS}{docs[3]}{EOS}{BOS}{docs[7]}{EOS}".startswith(val_text)
    assert docs[3] in val_text
    train_text = tok.decode(np.concatenate([s["tokens"] for s in read_split(out / "train")]).tolist())
    assert docs[3] not in train_text and docs[0] in train_text


def test_max_samples_reads_only_the_first_records(tmp_path: Path, tokenizers: dict[str, str]) -> None:
    docs = make_docs(20)
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    out, summary = run(tmp_path, [src], tokenizers["chat"], seq_len=8, max_samples=5)
    assert summary.splits["train"].documents == 5
    text = load(tokenizers["chat"]).decode(
        np.concatenate([s["tokens"] for s in read_split(out / "train")]).tolist()
    )
    assert docs[4][:20] in text and docs[5][:20] not in text


def test_zstd_and_parallel_give_the_same_samples(tmp_path: Path, tokenizers: dict[str, str]) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(300)])
    base = ConvertConfig(inputs=[str(src)], out="", tokenizer=tokenizers["chat"], seq_len=32, progress=False)
    serial = tmp_path / "serial"
    convert(ConvertConfig(**{**base.__dict__, "out": str(serial)}))
    parallel = tmp_path / "parallel"
    convert(ConvertConfig(**{**base.__dict__, "out": str(parallel), "num_proc": 2, "chunk_size": 16}))
    zstd = tmp_path / "zstd"
    convert(ConvertConfig(**{**base.__dict__, "out": str(zstd), "compression": "zstd"}))
    # Parallel tokenisation changes nothing, byte for byte.
    for name in ("index.json", "shard.00000.mds", "manifest.json"):
        assert (serial / "train" / name).read_bytes() == (parallel / "train" / name).read_bytes()
    assert (zstd / "train" / "shard.00000.mds.zstd").is_file()
    assert not (zstd / "train" / "shard.00000.mds").exists()
    a = [s["tokens"].tolist() for s in read_split(serial / "train")]
    b = [s["tokens"].tolist() for s in read_split(zstd / "train")]
    assert a == b


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="lists child processes through /proc")
def test_a_killed_worker_fails_the_conversion_with_a_clear_error(
    tmp_path: Path, tokenizers: dict[str, str]
) -> None:
    """A tokenisation worker killed from outside (as the kernel's OOM killer does): an error naming the cause
    and the fix, and nothing at --out, where a multiprocessing.Pool would wait forever for that worker."""
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(3000)])
    killed: list[int] = []

    def kill_first_worker() -> None:
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for pid in spawned_children()[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_worker, daemon=True)
    killer.start()
    with pytest.raises(DataError, match=r"tokenisation worker process died.*smaller --num-proc \(was 2\)"):
        run(tmp_path, [src], tokenizers["chat"], seq_len=32, num_proc=2, chunk_size=16)
    killer.join()
    assert killed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


# ---------------------------------------------------------------- SFT


def test_sft_split_is_exact_with_chat_template(tmp_path: Path, tokenizers: dict[str, str]) -> None:
    rows = [
        {"prompt": "What is masking?", "response": "Hiding tokens. café ✓"},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Name a step."},
                {"role": "assistant", "content": "Unmask the most confident token."},
            ]
        },
    ]
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    out, summary = run(tmp_path, [src], tokenizers["chat"], mode="sft", seq_len=200)
    tok = load(tokenizers["chat"])
    samples = read_split(out / "train")
    assert len(samples) == 2 and summary.splits["train"].samples == 2

    def turn(role: str, content: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"

    gen = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    expected = [
        (BOS + turn("user", "What is masking?") + gen, "Hiding tokens. café ✓<|eot_id|>" + EOS),
        (
            BOS
            + turn("system", "Be brief.")
            + turn("user", "Hi")
            + turn("assistant", "Hello.")
            + turn("user", "Name a step.")
            + gen,
            "Unmask the most confident token.<|eot_id|>" + EOS,
        ),
    ]
    for sample, (prompt, answer) in zip(samples, expected, strict=True):
        ids = sample["tokens"].tolist()
        n = int(sample["prompt_length"])
        assert tok.decode(ids[:n]) == prompt
        assert tok.decode(ids[n:]) == answer
        assert ids[-1] == tok.eos_token_id


def test_sft_pairs_without_template_and_parquet(tmp_path: Path, tokenizers: dict[str, str]) -> None:
    table = pa.table({"q": ["the model", "a schedule"], "a": ["reads tokens", "decides"]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    out, _ = run(
        tmp_path,
        [tmp_path / "pairs.parquet"],
        tokenizers["plain"],
        mode="sft",
        seq_len=64,
        fields=Fields(prompt="q", response="a"),
    )
    tok = load(tokenizers["plain"])
    for sample, (q, a) in zip(
        read_split(out / "train"), [("the model", "reads tokens"), ("a schedule", "decides")], strict=True
    ):
        ids = sample["tokens"].tolist()
        n = int(sample["prompt_length"])
        assert ids[:n] == tok.encode(q, add_special_tokens=False)  # no BOS in this tokenizer
        assert tok.decode(ids[n:]) == a + EOS


def test_sft_overlong_drop_and_truncate(tmp_path: Path, tokenizers: dict[str, str]) -> None:
    long_answer = " ".join(WORDS * 3)
    rows = [
        {"prompt": "short", "response": "fits"},
        {"prompt": "short", "response": long_answer},
        {"prompt": " ".join(WORDS * 3), "response": "prompt alone is too long"},
    ]
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    seq_len = 40
    out, summary = run(tmp_path, [src], tokenizers["chat"], mode="sft", seq_len=seq_len, overlong="drop")
    c = summary.splits["train"]
    assert (c.samples, c.dropped_overlong, c.truncated_samples) == (1, 2, 0)

    (tmp_path / "t").mkdir()
    out, summary = run(
        tmp_path / "t", [src], tokenizers["chat"], mode="sft", seq_len=seq_len, overlong="truncate"
    )
    c = summary.splits["train"]
    assert (c.samples, c.dropped_overlong, c.truncated_samples) == (2, 1, 1)
    samples = read_split(out / "train")
    assert len(samples[1]["tokens"]) == seq_len
    tok = load(tokenizers["chat"])
    n = int(samples[1]["prompt_length"])
    assert long_answer.startswith(tok.decode(samples[1]["tokens"][n:].tolist()))


def test_sft_empty_answer_is_an_error_or_dropped(tmp_path: Path, tokenizers: dict[str, str]) -> None:
    src = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "  "}]
    )
    with pytest.raises(DataError, match=rf"{src}:2: empty answer.*--drop-empty-answers"):
        run(tmp_path, [src], tokenizers["chat"], mode="sft", seq_len=32)
    assert not (tmp_path / "out").exists()
    _, summary = run(tmp_path, [src], tokenizers["chat"], mode="sft", seq_len=32, drop_empty_answers=True)
    assert summary.splits["train"].dropped_empty_answers == 1 and summary.splits["train"].samples == 1


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("content", "mode", "pattern"),
    [
        (
            b'{"text": "ok"}\n{"txt": "typo"}\n',
            "pretrain",
            r"d.jsonl:2: missing field 'text' \(keys \['txt'\]\).*--text-field",
        ),
        (b'{"text": "ok"}\n\n{"text": "ok"\n', "pretrain", r"d.jsonl:3: not valid JSON"),
        (
            b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
            "pretrain",
            r"d.jsonl:2: bytes that are not valid UTF-8.*iconv",
        ),
        (b'{"text": 5}\n', "pretrain", r"d.jsonl:1: field 'text' should be a string"),
        (b'{"text": "\\ud800"}\n', "pretrain", r"d.jsonl:1: field 'text' holds an unpaired surrogate"),
        (b"", "pretrain", r"empty input: no documents in .*d.jsonl"),
        (
            b'{"prompt": "a"}\n',
            "sft",
            r"d.jsonl:1: an SFT record needs 'messages' or both 'prompt' and 'response'",
        ),
        (
            b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n',
            "sft",
            r"d.jsonl:1: the last message of 'messages' has role 'user'",
        ),
    ],
)
def test_bad_jsonl_names_file_and_line(
    tmp_path: Path, tokenizers: dict[str, str], content: bytes, mode: str, pattern: str
) -> None:
    (tmp_path / "d.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=pattern):
        run(tmp_path, [tmp_path / "d.jsonl"], tokenizers["chat"], mode=mode, seq_len=8)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]  # no temporary folder left behind


def test_bad_text_file_and_parquet_and_inputs(tmp_path: Path, tokenizers: dict[str, str]) -> None:
    (tmp_path / "a.txt").write_bytes(b"line one\nline two\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"a.txt:3: bytes that are not valid UTF-8"):
        run(tmp_path, [tmp_path / "a.txt"], tokenizers["chat"], seq_len=8)
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b.parquet: no column 'text'.*\['content'\]"):
        run(tmp_path, [tmp_path / "b.parquet"], tokenizers["chat"], seq_len=8)
    with pytest.raises(DataError, match=r"no such file or folder"):
        run(tmp_path, [tmp_path / "missing.jsonl"], tokenizers["chat"], seq_len=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"input folder .*empty holds no input file"):
        run(tmp_path, [tmp_path / "empty"], tokenizers["chat"], seq_len=8)
    with pytest.raises(DataError, match=r"plain-text files hold no prompt/answer"):
        run(tmp_path, [tmp_path / "a.txt"], tokenizers["chat"], mode="sft", seq_len=8)


def test_tokenizer_without_eos_and_too_little_data(tmp_path: Path, tokenizers: dict[str, str]) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "the model"}])
    with pytest.raises(DataError, match=r"has no EOS token"):
        run(tmp_path, [src], tokenizers["no_eos"], seq_len=8)
    with pytest.raises(DataError, match=r"split 'train' got no sample.*lower --seq-len"):
        run(tmp_path, [src], tokenizers["chat"], seq_len=4096)
    with pytest.raises(DataError, match=r"tokenizer .*nowhere.*no such folder"):
        run(tmp_path, [src], str(tmp_path / "nowhere"), seq_len=8)
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_output_without_overwrite(tmp_path: Path, tokenizers: dict[str, str]) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(10)])
    out, _ = run(tmp_path, [src], tokenizers["chat"], seq_len=8, val_fraction=0.5)
    before = (out / "train" / "shard.00000.mds").read_bytes()
    with pytest.raises(DataError, match=r"output folder .*out is not empty; pass --overwrite"):
        run(tmp_path, [src], tokenizers["chat"], seq_len=16)
    assert (out / "train" / "shard.00000.mds").read_bytes() == before
    out, summary = run(tmp_path, [src], tokenizers["chat"], seq_len=16, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["train"] and summary.seq_len == 16
    assert json.loads((out / "train" / "manifest.json").read_text())["seq_len"] == 16
    # --overwrite never deletes a folder that is not a conversion's output
    (out / "keep.txt").write_text("precious")
    with pytest.raises(
        DataError, match=r"holds keep.txt, which no conversion wrote.*delete the folder yourself"
    ):
        run(tmp_path, [src], tokenizers["chat"], seq_len=8, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out"]


def _fail_after(n: int, action):
    from streaming import MDSWriter

    original = MDSWriter.write
    calls = {"n": 0}

    def write(self, sample):
        calls["n"] += 1
        if calls["n"] > n:
            action()
        return original(self, sample)

    return write


def _exit_3() -> None:
    os._exit(3)  # a hard kill: no cleanup code runs


def _convert_then_die(tmp_path: Path, src: Path, tokenizer: str) -> None:
    """Child process: a conversion whose process dies after five written samples."""
    from streaming import MDSWriter

    MDSWriter.write = _fail_after(5, _exit_3)  # type: ignore[method-assign]
    run(tmp_path, [src], tokenizer, seq_len=8)


def test_interrupted_conversion_leaves_nothing_a_loader_accepts(
    tmp_path: Path, tokenizers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from streaming import MDSWriter

    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(100)])
    cfg = LoaderConfig(local=str(tmp_path / "out"), split="train", num_workers=0)
    tok = load(tokenizers["chat"])

    # 1. An exception midway: nothing at out, no temporary folder left.
    def boom() -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(MDSWriter, "write", _fail_after(5, boom))
    with pytest.raises(RuntimeError, match="disk full"):
        run(tmp_path, [src], tokenizers["chat"], seq_len=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
    with pytest.raises(DataError, match=r"no shard folder .*out"):
        build_dataloader(cfg, tokenizer=tok, mode="pretrain", max_seq_len=8, device_batch_size=2)

    # 2. A hard kill midway (no cleanup code runs): only a hidden temporary folder remains.
    monkeypatch.undo()
    assert run_spawned(_convert_then_die, [(tmp_path, src, tokenizers["chat"])]) == [3]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "d.jsonl"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.tmp-")
    with pytest.raises(DataError, match=r"no shard folder .*out"):
        build_dataloader(cfg, tokenizer=tok, mode="pretrain", max_seq_len=8, device_batch_size=2)

    # 3. A failed --overwrite run keeps the previous output intact.
    monkeypatch.undo()
    run(tmp_path, [src], tokenizers["chat"], seq_len=8)
    before = (tmp_path / "out" / "train" / "shard.00000.mds").read_bytes()
    monkeypatch.setattr(MDSWriter, "write", _fail_after(5, boom))
    with pytest.raises(RuntimeError):
        run(tmp_path, [src], tokenizers["chat"], seq_len=16, overwrite=True)
    assert (tmp_path / "out" / "train" / "shard.00000.mds").read_bytes() == before


def load_cli() -> Any:
    """scripts/convert_to_mds.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "convert_to_mds", Path(__file__).parents[1] / "scripts" / "convert_to_mds.py"
    )
    assert spec and spec.loader
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_cli_prints_summary_and_reports_errors(
    tmp_path: Path, tokenizers: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    cli = load_cli()
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(40)])
    out = tmp_path / "out"
    args = [
        str(src),
        "--out",
        str(out),
        "--tokenizer",
        tokenizers["chat"],
        "--seq-len",
        "16",
        "--val-fraction",
        "0.1",
    ]
    cli.main([*args, "--no-progress"])
    printed = capsys.readouterr().out
    assert "pretrain shards of seq_len 16" in printed and "samples" in printed
    assert (out / "train" / "manifest.json").is_file() and (out / "val" / "manifest.json").is_file()
    before = sorted(p.name for p in tmp_path.iterdir())
    for extra, message in [
        (["--no-progress"], f"output folder {out} is not empty; pass --overwrite to replace it"),
        (["--val-fraction", "1.5"], "val_fraction must be in [0, 1), got 1.5"),
        (["--overwrite", "--shard-size", "64 megabytes"], "shard_size must be a size under 4gb such as 64mb"),
        (["--mode", "dpo"], "convert_to_mds.py: argument --mode: invalid choice: 'dpo'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*args, *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"composer-dlm: error: {message}"), err
        assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written beside out


def test_cli_mode_flag_and_sft_alias_give_the_same_shards(tmp_path: Path, tokenizers: dict[str, str]) -> None:
    """`--mode sft` (what the YAMLs and README say) and the older `--sft` write identical SFT shards."""
    cli = load_cli()
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "response": f"a {i}"} for i in range(6)])
    common = [str(src), "--tokenizer", tokenizers["chat"], "--seq-len", "64", "--no-progress"]
    for name, flag in (("mode", ["--mode", "sft"]), ("alias", ["--sft"])):
        cli.main([*common, "--out", str(tmp_path / name), *flag])
    manifest = json.loads((tmp_path / "mode" / "train" / "manifest.json").read_text())
    assert manifest["mode"] == "sft" and manifest["counts"]["samples"] == 6
    shards = sorted(p.name for p in (tmp_path / "mode" / "train").glob("*.mds"))
    assert shards and all(
        (tmp_path / "mode" / "train" / n).read_bytes() == (tmp_path / "alias" / "train" / n).read_bytes()
        for n in shards
    )


def test_cli_help_does_not_import_torch() -> None:
    script = Path(__file__).parents[1] / "scripts" / "convert_to_mds.py"
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{str(script)!r}, '--help']\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "--mode {pretrain,sft}" in out and "--overlong {drop,truncate}" in out
    assert out.strip().endswith("NO-TORCH")


def test_overlong_sft_advice_says_raise_seq_len(tmp_path: Path, tokenizers: dict[str, str]) -> None:
    """Every SFT sample is longer than --seq-len: the fix is a longer --seq-len (or truncation), never a shorter."""
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "response": " ".join(WORDS)}] * 4)
    cfg = ConvertConfig(
        inputs=[str(src)],
        out=str(tmp_path / "o"),
        tokenizer=tokenizers["chat"],
        mode="sft",
        seq_len=8,
        progress=False,
    )
    with pytest.raises(DataError, match=r"4 over-long.*raise --seq-len above 8, or pass --overlong truncate"):
        convert(cfg)
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == [src]


def test_a_killed_conversions_staging_folder_is_removed_by_the_next(
    tmp_path: Path, tokenizers: dict[str, str]
) -> None:
    """SIGKILL leaves `.out.tmp-PID-RAND`; the next conversion to that --out removes it (its PID is gone)."""
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(3000)])
    out = tmp_path / "out"
    code = (
        "import sys\nfrom composer_dlm.data import ConvertConfig, convert\n"
        f"convert(ConvertConfig(inputs=[{str(src)!r}], out={str(out)!r}, tokenizer={tokenizers['chat']!r}, "
        "seq_len=16, chunk_size=1, shard_size='1kb', progress=False))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.tmp-*/train/shard.*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    stale = list(tmp_path.glob(".out.tmp-*"))
    assert len(stale) == 1 and not out.exists()
    live = tmp_path / f".out.tmp-{os.getpid()}-0000"  # a conversion still running in a live process
    live.mkdir()
    convert(
        ConvertConfig(
            inputs=[str(src)], out=str(out), tokenizer=tokenizers["chat"], seq_len=16, progress=False
        )
    )
    assert (out / "train" / "index.json").is_file()
    assert sorted(tmp_path.glob(".out.tmp-*")) == [live]


@pytest.mark.parametrize("shard_size", ["64 megabytes", "-1", "4gb"])
def test_bad_shard_size_is_refused_before_any_work(tmp_path: Path, shard_size: str) -> None:
    with pytest.raises(ValueError, match=rf"shard_size must be a size .*got '{shard_size}'"):
        ConvertConfig(inputs=["x"], out=str(tmp_path / "out"), tokenizer="embedded", shard_size=shard_size)
    for ok in ("64mb", "512kb", "1000"):
        assert ConvertConfig(inputs=["x"], out="o", tokenizer="embedded", shard_size=ok).shard_size == ok
