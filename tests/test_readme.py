"""The README's commands, run as written, on data this test converts with our converter.

The commands are read from the README's indented code blocks (sections Quickstart, Preparing data and
Training), so an edit that breaks one fails here. They run in a scratch folder that links the checkout's
scripts/, yamls/ and composer_dlm/, so relative paths resolve as in a clone. What the test changes, and
nothing else: placeholder paths (/data/..., /models/LLaDA-8B-Base) point into the scratch folder, and
training commands get a few overrides that make them tiny (duration, batch, model size). One quickstart run
goes through Composer's launcher (`composer ...`), the others call the same entry points in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from composer_dlm import train
from composer_dlm.data import synthetic
from composer_dlm.data.tokenizer import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LLADA_TOKENIZER = "/models/LLaDA-8B-Base"

# Small overrides only: fewer batches, smaller evaluation and sampling, no loader worker processes.
QUICK = [
    "max_duration=4ba",
    "eval_interval=2ba",
    "eval_subset_num_batches=1",
    "checkpoint.save_interval=2ba",
    "callbacks.samples.interval=4ba",
    "callbacks.samples.gen_length=8",
    "callbacks.samples.steps=4",
    "train_loader.num_workers=0",
]
# yamls/llada_1b.yaml is a 1.65B-parameter GPU config: shrink the model and the batch for a CPU.
TINY_LLADA = [
    *QUICK,
    "model.config.d_model=32",
    "model.config.n_layers=2",
    "model.config.n_heads=2",
    "model.config.n_kv_heads=2",
    "model.config.mlp_hidden_size=64",
    "model.config.max_sequence_length=64",
    "model.compile_blocks=false",
    "precision=fp32",
    "max_seq_len=64",
    "global_train_batch_size=4",
    "device_train_microbatch_size=2",
    "device_eval_batch_size=2",
    "callbacks.samples.block_length=8",
    "eval_loader.num_workers=0",
    "fsdp=null",
]


def readme_commands(section: str) -> list[str]:
    """The commands in the indented code blocks of the README section titled `section` (`## ...`)."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(section)}.*?$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README has no section {section!r}"
    commands: list[str] = []
    pending, in_block, in_fence, previous_blank = "", False, False, True
    for line in match.group(1).splitlines():
        if line.startswith("```"):  # fenced blocks hold YAML, not commands
            in_fence = not in_fence
        elif not in_fence and line.startswith("    ") and (in_block or previous_blank):
            in_block = True
            command = pending + line.strip()
            pending = command[:-1] if command.endswith("\\") else ""  # a continued line
            if not pending:
                commands.append(command)
        else:
            in_block = False
        previous_blank = not line.strip()
    return commands


def load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_inputs(ws: Path) -> None:
    """Pretraining text as .txt, JSONL and Parquet; SFT as prompt/response JSONL and chat Parquet."""
    docs = synthetic.documents(900, seed=7)
    corpus = ws / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(docs[:300]):
        (corpus / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    (corpus / "more.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[300:600]))
    pq.write_table(pa.table({"text": docs[600:]}), corpus / "rest.parquet")
    pairs = synthetic.sft_pairs(400, seed=7)
    (ws / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:200]))
    chats = [
        [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}]
        for p in pairs[200:]
    ]
    pq.write_table(pa.table({"messages": chats}), ws / "chats.parquet")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder laid out like a clone: scripts/, yamls/, composer_dlm/ linked, inputs written."""
    ws = tmp_path_factory.mktemp("readme")
    for name in ("scripts", "yamls", "composer_dlm"):
        (ws / name).symlink_to(ROOT / name)
    write_inputs(ws)
    # Stand-ins for the README's absolute placeholders: a corpus folder and a tokenizer folder with
    # LLaDA's special tokens (trained here; LLaDA's own is 126k tokens and not downloadable in CI).
    (ws / "abs" / "data" / "corpus").mkdir(parents=True)
    for i, doc in enumerate(synthetic.documents(1500, seed=8)):
        (ws / "abs" / "data" / "corpus" / f"{i}.txt").write_text(doc, encoding="utf-8")
    train_bpe_tokenizer(synthetic.documents(300), vocab_size=512).save_pretrained(str(ws / "abs" / "llada"))
    return ws


def localize(command: str, ws: Path) -> list[str]:
    """The command's argv, with the README's absolute placeholder paths moved into `ws`."""
    command = command.replace(LLADA_TOKENIZER, str(ws / "abs" / "llada")).replace(
        " /data/", f" {ws}/abs/data/"
    )
    command = command.replace("=/data/", f"={ws}/abs/data/")
    return shlex.split(command)


def run(argv: list[str], extra: list[str] | None = None) -> int:
    """Run one README command in this process (the cwd is the scratch folder); returns its exit code."""
    entry: Callable[[list[str]], Any]
    if argv[:2] == ["python", "scripts/convert_to_mds.py"]:
        entry = load_script("convert_to_mds").main
    elif argv[:2] == ["python", "scripts/generate.py"]:
        from composer_dlm.generate_cli import main as entry
    elif argv[:2] == ["composer", "composer_dlm/train.py"]:
        entry = train.main
    else:
        raise AssertionError(f"the README runs a command this test does not know: {shlex.join(argv)}")
    try:
        code = entry(argv[2:] + (extra or []))
    except SystemExit as e:
        code = e.code
    return int(code or 0)


def assert_generates(code: int, capsys: pytest.CaptureFixture[str]) -> None:
    """generate.py ran: an answer printed (exit 0), or, from a model this briefly trained, only EOS tokens,
    which it reports as such (exit 3, see the README's troubleshooting table)."""
    out, err = capsys.readouterr()
    if code == 3:
        assert "composer-dlm: note: every answer is empty: the model produced only" in err
    else:
        assert code == 0 and out.strip(), (code, out, err)


def test_readme_sections_hold_the_commands_run_here() -> None:
    """The parser finds every command (a README edit that hides one from this test fails here)."""
    assert readme_commands("Quickstart") == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
        "composer composer_dlm/train.py yamls/quickstart.yaml",
        'python scripts/generate.py runs/quickstart --prompt "The capital of Italy is" --gen-length 8',
    ]
    prep = readme_commands("Preparing data")
    assert [c.split(" --")[0] for c in prep[:6]] == [
        "python scripts/convert_to_mds.py",
        "python scripts/convert_to_mds.py corpus/",
        "python scripts/convert_to_mds.py pairs.jsonl chats.parquet",
        "composer composer_dlm/train.py yamls/quickstart.yaml train_loader.local=data/pretrain run_name=my_pretrain",
        "composer composer_dlm/train.py yamls/quickstart.yaml train_loader.local=data/sft diffusion.mode=sft "
        "run_name=my_sft",
        "python scripts/generate.py runs/my_sft/hf/final",
    ]
    training = readme_commands("Training")
    assert training[0].startswith("python scripts/convert_to_mds.py /data/corpus --out /data/mds")
    assert training[1].startswith(
        "composer composer_dlm/train.py yamls/llada_1b.yaml train_loader.local=/data/mds"
    )


@pytest.mark.slow
def test_quickstart_through_composers_launcher(ws: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The quickstart's last step as a user types it (`composer ...`, the launcher), then its sampling command."""
    install_and_train, generate = readme_commands("Quickstart")
    command = install_and_train.split(" && ")[-1]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*shlex.split(command), *QUICK], cwd=ws, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_folder = ws / "runs" / "quickstart"
    assert (run_folder / "hf" / "final" / "config.json").is_file()
    assert (run_folder / "plots" / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "[sample @ batch 4]" in (run_folder / "samples.txt").read_text()
    monkeypatch.chdir(ws)
    capsys.readouterr()
    assert_generates(run(shlex.split(generate)), capsys)  # the run folder: its hf/final


@pytest.mark.slow
def test_preparing_data_commands_as_written(ws: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Convert text/JSONL/Parquet for pretraining and prompt/response/chat for SFT, train on both, sample."""
    monkeypatch.chdir(ws)
    help_, convert_pretrain, convert_sft, train_pretrain, train_sft, generate = readme_commands(
        "Preparing data"
    )[:6]
    assert run(shlex.split(help_)) == 0
    assert "--mode {pretrain,sft}" in capsys.readouterr().out

    assert run(shlex.split(convert_pretrain)) == 0
    assert run(shlex.split(convert_sft)) == 0
    pre = {
        s: json.loads((ws / "data" / "pretrain" / s / "manifest.json").read_text()) for s in ("train", "val")
    }
    sft = {s: json.loads((ws / "data" / "sft" / s / "manifest.json").read_text()) for s in ("train", "val")}
    assert pre["train"]["mode"] == "pretrain" and pre["train"]["seq_len"] == 128
    assert (
        sum(m["counts"]["documents"] for m in pre.values()) == 900
    )  # 300 .txt + 300 JSONL + 300 Parquet rows
    assert sft["train"]["mode"] == "sft" and sum(m["counts"]["samples"] for m in sft.values()) == 400
    assert {"more.jsonl", "rest.parquet", "doc299.txt"} <= set(pre["train"]["inputs"])
    assert set(sft["train"]["inputs"]) == {"pairs.jsonl", "chats.parquet"}

    assert run(shlex.split(train_pretrain), QUICK) == 0
    assert run(shlex.split(train_sft), QUICK) == 0
    for name in ("my_pretrain", "my_sft"):
        assert (ws / "runs" / name / "hf" / "final" / "config.json").is_file()
    samples = (ws / "runs" / "my_sft" / "samples.txt").read_text()
    assert "<|start_header_id|>user" in samples or "[sample @ batch 4]" in samples
    capsys.readouterr()
    assert_generates(run(shlex.split(generate)), capsys)


def test_training_section_command_on_converted_data(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's first report: `train_loader.local=/data/mds` with yamls/llada_1b.yaml must read
    /data/mds/train (and the eval loader /data/mds/val), the folders the converter wrote."""
    monkeypatch.chdir(ws)
    convert, train_command = (localize(c, ws) for c in readme_commands("Training")[:2])
    # A small corpus cannot fill 4096-token sequences: a shorter --seq-len and a larger validation share.
    assert run(convert, ["--seq-len", "64", "--val-fraction", "0.05"]) == 0
    assert sorted(p.name for p in (ws / "abs" / "data" / "mds").iterdir()) == ["train", "val"]
    vocab = json.loads((ws / "abs" / "data" / "mds" / "train" / "manifest.json").read_text())["tokenizer"]
    sizes = [
        f"model.config.vocab_size={vocab['vocab_size']}",
        f"model.config.embedding_size={vocab['vocab_size']}",
    ]
    assert run(train_command, [*TINY_LLADA, *sizes, f"base_path={ws / 'runs'}"]) == 0
    assert (ws / "runs" / "llada_1b" / "hf" / "final" / "config.json").is_file()
