"""Crash safety end to end: a run SIGKILLed repeatedly (mid-save, between Composer's symlink remove and create,
and at random times) and resumed each time ends with exactly the weights and losses of an uninterrupted run."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults import kill_after_batches, rank0_metrics

from composer_dlm.checkpoints import (
    is_complete_checkpoint,
    manifest_path,
    repair_checkpoint_folder,
    write_manifest,
)

ROOT = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).parent / "faults.py"
STEPS = 12


def overrides(base: Path) -> list[str]:
    return [
        f"base_path={base}",
        "run_name=crash",
        "model.config.d_model=32",
        "model.config.n_layers=2",
        "model.config.n_heads=2",
        "model.config.mlp_hidden_size=64",
        "model.loss_impl=plain",
        "max_seq_len=32",
        "global_train_batch_size=8",
        "device_train_microbatch_size=8",
        f"max_duration={STEPS}ba",
        "eval_interval=1000ba",
        "checkpoint.save_interval=2ba",
        "checkpoint.save_num_checkpoints_to_keep=3",
        "callbacks.samples=null",
        "callbacks.hf_export=null",
        "train_loader.num_workers=0",
        "diffusion.random_length_prob=0.2",
        "logging.console_interval=1ba",
    ]


def launch(base: Path, mode: str = "none", n: int = 0) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(FAULTS),
        mode,
        str(n),
        str(ROOT / "yamls" / "quickstart.yaml"),
        *overrides(base),
    ]
    env = os.environ | {"PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0"}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )


def final_weights(base: Path) -> dict[str, torch.Tensor]:
    path = base / "crash" / "checkpoints" / f"ep0-ba{STEPS}-rank0.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["state"]["model"]


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    reference = launch(tmp_path / "ref")
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out

    faulty = tmp_path / "faulty"
    outputs = []
    # 1: dies halfway through writing its 2nd checkpoint (ba4): ba4 is truncated, latest still -> ba2.
    p = launch(faulty, "save", 2)
    outputs.append(p.communicate(timeout=600)[0])
    assert p.returncode == -9
    assert not is_complete_checkpoint(faulty / "crash" / "checkpoints" / "ep0-ba4-rank0.pt")
    # 2: resumes from ba2, then dies at its 2nd checkpoint (ba6) between removing latest and re-creating it.
    p = launch(faulty, "relink", 2)
    outputs.append(p.communicate(timeout=600)[0])
    assert p.returncode == -9
    assert "incomplete checkpoint(s) moved aside: ep0-ba4-rank0.pt.incomplete" in outputs[-1]
    assert outputs[-1].count("moved aside") == 1  # reported once, not also as a log warning
    assert not (faulty / "crash" / "checkpoints" / "latest-rank0.pt").exists()
    # 3..: killed after a random number of training batches, then run until it finishes.
    rng = random.Random(1234)
    for attempt in range(8):
        p = launch(faulty)
        outputs.append(
            kill_after_batches(p, rng.randint(1, 3)) if attempt < 2 else p.communicate(timeout=600)[0]
        )
        if p.returncode == 0:
            break
    assert p.returncode == 0, outputs[-1]
    assert "resuming from the last complete checkpoint ep0-ba6-rank0.pt" in outputs[2]

    ref_w, got_w = final_weights(tmp_path / "ref"), final_weights(faulty)
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        assert torch.equal(ref_w[name], got_w[name]), name
    ref_curve = rank0_metrics(tmp_path / "ref" / "crash", "loss/train/total")
    got_curve = rank0_metrics(faulty / "crash", "loss/train/total")
    assert sorted(ref_curve) == list(range(STEPS))  # Composer logs batch k under step k - 1
    assert got_curve == ref_curve


def test_repair_relinks_to_newest_complete_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for step in (2, 4):
        torch.save({"step": step}, folder / f"ep0-ba{step}-rank0.pt")
    data = (folder / "ep0-ba4-rank0.pt").read_bytes()
    (folder / "ep0-ba6-rank0.pt").write_bytes(data[: len(data) // 2])
    os.symlink("ep0-ba6-rank0.pt", folder / "latest-rank0.pt")
    report = repair_checkpoint_folder(folder)
    assert report.latest == folder / "ep0-ba4-rank0.pt"
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba4-rank0.pt"
    assert (folder / "ep0-ba6-rank0.pt.incomplete").exists()
    assert "resuming from the last complete checkpoint ep0-ba4-rank0.pt" in (report.message() or "")
    # a healthy folder is left alone
    assert repair_checkpoint_folder(folder).message() is None


def test_repair_leaves_a_sharded_checkpoint_alone(tmp_path):
    """FSDP sharded checkpoints are folders of .distcp shards with `latest` pointing at the folder: there is no
    single-file checkpoint, which must not be read as "nothing complete" (deleting `latest`, restarting)."""
    folder = tmp_path / "ckpt"
    (folder / "ep0-ba4").mkdir(parents=True)
    (folder / "ep0-ba4" / "__0_0.distcp").write_bytes(b"shard")
    os.symlink("ep0-ba4", folder / "latest-rank0.pt")
    report = repair_checkpoint_folder(folder)
    assert report.message() is None and not report.quarantined
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba4"
    assert (folder / "ep0-ba4" / "__0_0.distcp").read_bytes() == b"shard"


def test_completeness_is_judged_from_the_manifest_without_reading_tensors(tmp_path):
    """A checkpoint's manifest (written at save) is compared at start from the file's size, its zip directory and
    its pickle: a tensor byte damaged in place is not read (the check costs the same at 64 MB as at 64 GB), while
    a truncated file, a torn zip directory or a pickle that changed since the save are caught; a checkpoint
    without a manifest (older runs) is judged by its zip directory alone."""
    path = tmp_path / "ep0-ba2-rank0.pt"
    torch.save({"state": {"w": torch.zeros(16 << 20)}, "step": 2}, path)
    assert is_complete_checkpoint(path)  # no manifest yet: the zip directory alone
    write_manifest(path)
    assert manifest_path(path).is_file() and is_complete_checkpoint(path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the tensor's storage
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))
    assert is_complete_checkpoint(path)  # tensors are not read
    torch.save({"state": {"w": torch.zeros(16 << 20)}, "step": 3}, path)  # another pickle, same size
    assert not is_complete_checkpoint(path)
    manifest_path(path).unlink()
    assert is_complete_checkpoint(path)
    path.write_bytes(path.read_bytes()[:-100])  # the end of the zip directory lost
    assert not is_complete_checkpoint(path)


def test_repair_and_retention_take_the_manifest_along(tmp_path):
    from composer_dlm.checkpoints import prune_checkpoints

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for step in (2, 4, 6):
        torch.save({"step": step}, folder / f"ep0-ba{step}-rank0.pt")
        write_manifest(folder / f"ep0-ba{step}-rank0.pt")
    torch.save({"step": 66}, folder / "ep0-ba6-rank0.pt")  # replaced after its manifest was written
    os.symlink("ep0-ba6-rank0.pt", folder / "latest-rank0.pt")
    assert repair_checkpoint_folder(folder).latest == folder / "ep0-ba4-rank0.pt"
    assert not manifest_path(folder / "ep0-ba6-rank0.pt").exists()
    assert prune_checkpoints(folder, keep=1) == [folder / "ep0-ba2-rank0.pt"]
    assert sorted(p.name for p in folder.glob("*.json")) == ["ep0-ba4-rank0.pt.manifest.json"]
