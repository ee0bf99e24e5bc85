"""Ctrl-C at the terminal (SIGINT to the whole process group) during training and during conversion: one line,
exit 130, no traceback, nothing half-written, and the same command run again picks up (training resumes from its
last checkpoint; conversion starts over into a clean --out)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults import ROOT, kill_group, rank0_metrics_by_attempt, wait_for_batches
from test_train import tiny_overrides

pytestmark = pytest.mark.slow

ENV = os.environ | {"PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0", "TOKENIZERS_PARALLELISM": "false"}


def start(args: list[str]) -> subprocess.Popen:
    """``python ARGS`` in its own process group, as a terminal runs a command (Ctrl-C signals the group)."""
    return subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        cwd=ROOT,
        start_new_session=True,
    )


def assert_one_line_130(p: subprocess.Popen, out: str, what: str) -> None:
    assert p.returncode == 130, out[-4000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-4000:]
    ours = [line for line in out.splitlines() if line.startswith("composer-dlm:")]
    assert ours == [line for line in ours if line.startswith(f"composer-dlm: interrupted (Ctrl-C); {what}")]
    assert len(ours) == 1, out[-4000:]


def test_ctrl_c_during_training_is_one_line_and_resumes(tmp_path: Path) -> None:
    args = [
        "composer_dlm/train.py",
        "yamls/quickstart.yaml",
        *tiny_overrides(tmp_path, **{"checkpoint.save_interval": "2ba", "callbacks.samples": "null"}),
    ]
    p = start(args)
    try:
        out = wait_for_batches(p, 3)  # after the checkpoint at batch 2
        kill_group(p, signal.SIGINT)
        out += p.communicate(timeout=120)[0]
    finally:
        kill_group(p)
    assert_one_line_130(p, out, "run the same command again to resume")
    p = start(args)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-4000:]
    attempts = rank0_metrics_by_attempt(tmp_path / "tiny", "loss/train/total")
    assert len(attempts) == 2 and min(attempts[1]) >= 2 and max(attempts[1]) == 5


def test_ctrl_c_during_conversion_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    corpus = tmp_path / "docs.jsonl"
    words = "the cat sat on a mat while seven dogs ran past the old red barn".split()
    with corpus.open("w") as f:
        for i in range(200_000):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(40))}) + "\n")
    out_dir = tmp_path / "mds"
    cmd = ["scripts/convert_to_mds.py", str(corpus), "--out", str(out_dir), "--tokenizer", "embedded"]
    cmd += ["--seq-len", "64", "--num-proc", "2", "--no-progress"]
    p = start(cmd)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(".mds.tmp-*")) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # tokenising and writing shards
        assert p.poll() is None, "the conversion ended before it could be interrupted"
        kill_group(p, signal.SIGINT)
        out = p.communicate(timeout=120)[0]
    finally:
        kill_group(p)
    assert_one_line_130(p, out, f"nothing was written to {out_dir}")
    assert not out_dir.exists() and not list(tmp_path.glob(".mds*"))
    done = subprocess.run(
        [sys.executable, *cmd, "--max-samples", "2000"], capture_output=True, text=True, env=ENV, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (out_dir / "train" / "manifest.json").is_file()
