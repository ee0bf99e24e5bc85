"""The installed console commands work from outside the source tree, as a user of the package runs them.

Run with cwd=tmp_path and only the venv's bin/ added to PATH, so nothing is found through the checkout's
scripts/ or the working directory. Reference: the same conversion run in this process (what scripts/convert_to_mds.py calls).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from streaming import LocalDataset

from composer_dlm.data import ConvertConfig, convert
from composer_dlm.data.tokenizer import train_bpe_tokenizer

BIN = Path(sys.executable).parent
COMMANDS = [
    "composer-dlm-train",
    "composer-dlm-convert",
    "composer-dlm-generate",
    "composer-dlm-benchmark",
    "composer-dlm-make-yamls",
]


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**clean, "PATH": f"{BIN}{os.pathsep}{clean.get('PATH', '')}"}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)


def test_every_command_is_installed_and_points_at_the_packages_main() -> None:
    """The console scripts exist in the venv's bin/ and their entry points load the functions the scripts call."""
    from composer_dlm import commands, generate_cli, train
    from composer_dlm.eval import main as eval_main

    expected = {
        "composer-dlm-train": train.main,
        "composer-dlm-convert": commands.convert,
        "composer-dlm-generate": generate_cli.main,
        "composer-dlm-eval": eval_main,
        "composer-dlm-benchmark": commands.benchmark,
        "composer-dlm-make-yamls": commands.make_yamls,
    }
    found = {
        ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("composer-dlm-")
    }
    missing = sorted(set(expected) - set(found))
    assert not missing, f"{missing} not installed: run `pip install -e .` again"
    for name, function in expected.items():
        assert found[name].load() is function
        assert shutil.which(name, path=str(BIN)) is not None, (
            f"{name} is not in {BIN}: run `pip install -e .`"
        )


@pytest.mark.parametrize(
    ("command", "shows"),
    [
        ("composer-dlm-convert", "--hf-dataset NAME"),
        ("composer-dlm-benchmark", "usage: composer-dlm-benchmark {kernel, loader, train, sampler"),
        ("composer-dlm-make-yamls", "usage: composer-dlm-make-yamls"),
    ],
)
def test_help_from_outside_the_tree(command: str, shows: str, tmp_path: Path) -> None:
    done = run([command, "--help"], tmp_path)
    assert done.returncode == 0 and shows in done.stdout, done.stderr


def test_convert_from_outside_the_tree_matches_the_script(tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    docs = [f"note {i}: the installed command converts text like the script does" for i in range(40)]
    train_bpe_tokenizer(docs, vocab_size=300).save_pretrained(str(work / "tok"))
    (work / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    args = ["d.jsonl", "--tokenizer", "tok", "--seq-len", "16", "--no-progress"]
    done = run(["composer-dlm-convert", *args, "--out", "shards"], work)
    assert done.returncode == 0, done.stderr
    assert "pretrain shards of seq_len 16" in done.stdout
    reference = ConvertConfig(
        inputs=[str(work / "d.jsonl")],
        out=str(work / "ref"),
        tokenizer=str(work / "tok"),
        seq_len=16,
        progress=False,
    )
    convert(reference)  # what scripts/convert_to_mds.py runs, in this process
    names = sorted(p.name for p in (work / "ref" / "train").glob("*.mds"))
    assert names
    for name in names:
        assert (work / "shards" / "train" / name).read_bytes() == (work / "ref" / "train" / name).read_bytes()
    assert len(LocalDataset(str(work / "shards" / "train"))) > 0
    bad = run(
        ["composer-dlm-convert", "missing.jsonl", "--tokenizer", "tok", "--seq-len", "16", "--out", "x"], work
    )
    assert bad.returncode == 2 and bad.stderr.startswith(
        "composer-dlm: error: input missing.jsonl: no such file"
    )
