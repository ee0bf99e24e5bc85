"""Two processes through Composer's launcher on CPU (gloo, so DDP): the user's path of ``composer -n 2``.

Composer 0.32.1's FSDP cannot run on CPU (it places every FSDP unit on ``torch.cuda.current_device()``), so
here an ``fsdp:`` section runs as DDP; every FSDP mode is run in tests/test_gpu_multigpu.py.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from faults import (
    ROOT,
    kill_after_batches,
    kill_group,
    launch_ranks,
    live_group_members,
    rank0_metrics,
    rank0_metrics_by_attempt,
    run_ranks,
    wait_for_batches,
)
from test_train import tiny_overrides

from composer_dlm.checkpoints import is_complete_checkpoint
from composer_dlm.data import ensure_embedded_corpus
from composer_dlm.models import LLaDAModel
from composer_dlm.models.composer_llada import llada_weights

pytestmark = pytest.mark.world_size(2)

QUICKSTART = str(ROOT / "yamls" / "quickstart.yaml")
FAULTS = str(ROOT / "tests" / "faults.py")
TRAIN = str(ROOT / "composer_dlm" / "train.py")
# Triton is not used (model.loss_impl=plain): no interpreter start-up in each rank.
ENV = {"TRITON_INTERPRET": "0"}


def tiny(base: Path, run: str, **extra: str) -> list[str]:
    """test_train's tiny quickstart (2 layers, 32 tokens, global batch 8: 4 rows per process), as ``run``."""
    return tiny_overrides(base, run_name=run, **{"diffusion.random_length_prob": "0.3"} | extra)


@pytest.mark.slow
def test_quickstart_with_two_processes(tmp_path):
    """Samples, eval, likelihood eval and HF export all run under DDP (they crashed on DDP's wrapper before)."""
    mc = tmp_path / "mc.jsonl"
    rows = [
        {"prompt": "The list", "choices": [" is", " of"], "answer": 0},
        {"prompt": "import", "choices": [" os", " sys", " re"], "answer": 2},
    ]
    mc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = tiny(
        tmp_path,
        "qs",
        max_duration="4ba",
        eval_interval="2ba",
        eval_subset_num_batches="2",
        **{
            "checkpoint.save_interval": "4ba",
            "callbacks.samples.interval": "2ba",
            "callbacks.samples.prompts": "[The, A list is]",
            "callbacks.samples.gen_length": "8",
            "callbacks.samples.steps": "4",
            "callbacks.hf_export.interval": "2ba",
            "callbacks.likelihood_eval.data": str(mc),
            "callbacks.likelihood_eval.interval": "2ba",
            "callbacks.likelihood_eval.num_samples": "2",
        },
    )
    run_ranks(2, [TRAIN, QUICKSTART, *args], ENV)
    run = tmp_path / "qs"
    # Both ranks trained (each writes its own log), rank 0 alone reported.
    assert len(list((run / "logs").glob("rank1-*.txt"))) == 1
    samples = (run / "samples.txt").read_text().splitlines()
    assert [line.split("]")[0] for line in samples] == ["[sample @ batch 2"] * 2 + ["[sample @ batch 4"] * 2
    assert sorted(rank0_metrics(run, "eval/mc_accuracy")) == [2, 4]
    assert 2 in rank0_metrics(run, "metrics/eval/ELBO")
    # The final export holds the trained weights: those of the last checkpoint, in bf16.
    exported = LLaDAModel.from_pretrained(run / "hf" / "final").state_dict()
    ckpt = torch.load(run / "checkpoints" / "ep0-ba4-rank0.pt", map_location="cpu", weights_only=False)
    trained = llada_weights(ckpt["state"]["model"])
    assert trained.keys() == exported.keys()
    for name, tensor in trained.items():
        assert torch.equal(exported[name].to(torch.bfloat16), tensor.to(torch.bfloat16)), name
    assert (run / "hf" / "ba2" / "config.json").is_file()
    # The loss plot, written by rank 0 at the end, atomically (nothing else left in its folder).
    assert [p.name for p in (run / "plots").iterdir()] == ["loss.png"]
    assert (run / "plots" / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


STEPS = 6


def final_weights(run_folder: Path) -> dict[str, torch.Tensor]:
    state = torch.load(
        run_folder / "checkpoints" / f"ep0-ba{STEPS}-rank0.pt", map_location="cpu", weights_only=False
    )
    return state["state"]["model"]


CRASH_ARGS = dict(max_duration=f"{STEPS}ba", eval_interval="1000ba") | {
    "checkpoint.save_interval": "2ba",
    "callbacks.samples": "null",
    "callbacks.hf_export": "null",
}


def assert_same_run(ref: Path, got: Path) -> None:
    """``got`` ended with the weights and the per-batch losses of the uninterrupted ``ref``, bit for bit."""
    ref_w, got_w = final_weights(ref), final_weights(got)
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        assert torch.equal(ref_w[name], got_w[name]), name
    ref_loss = rank0_metrics(ref, "loss/train/total")
    got_loss = rank0_metrics(got, "loss/train/total")
    assert sorted(ref_loss) == list(range(STEPS)) and got_loss == ref_loss


@pytest.mark.slow
def test_killed_mid_save_and_mid_run_resumes_bit_identical(tmp_path):
    """Two processes, SIGKILLed while rank 0 writes a checkpoint and again mid-run (the launcher and both ranks
    at once), restarted each time: the final weights equal an uninterrupted two-process run's, bit for bit."""
    args = CRASH_ARGS
    run_ranks(2, [TRAIN, QUICKSTART, *tiny(tmp_path / "ref", "crash", **args)], ENV)

    base = tmp_path / "faulty"
    # 1: rank 0 dies halfway through writing its 2nd checkpoint (ba4); the launcher takes rank 1 down.
    p = launch_ranks(2, [FAULTS, "save", "2", QUICKSTART, *tiny(base, "crash", **args)], ENV)
    out, _ = p.communicate(timeout=600)
    assert p.returncode != 0, out
    assert not is_complete_checkpoint(base / "crash" / "checkpoints" / "ep0-ba4-rank0.pt")
    # 2: moves the torn ba4 aside, resumes from ba2, and is killed (all processes at once) after one batch.
    p = launch_ranks(2, [TRAIN, QUICKSTART, *tiny(base, "crash", **args)], ENV)
    out = kill_after_batches(p, 1, group=True)
    assert "resuming from the last complete checkpoint ep0-ba2-rank0.pt" in out, out
    # 3: runs to the end.
    run_ranks(2, [TRAIN, QUICKSTART, *tiny(base, "crash", **args)], ENV)
    assert_same_run(tmp_path / "ref" / "crash", base / "crash")


@pytest.mark.slow
def test_killed_launcher_takes_its_ranks_down_and_the_rerun_resumes(tmp_path):
    """SIGKILL to the launcher's pid alone (as an OOM killer or a scheduler may send): no rank survives it by 30 s
    (they used to train on, orphaned, to the end), and the re-run resumes from the last checkpoint and ends bit
    for bit as an uninterrupted run."""
    run_ranks(2, [TRAIN, QUICKSTART, *tiny(tmp_path / "ref", "crash", **CRASH_ARGS)], ENV)
    base = tmp_path / "faulty"
    p = launch_ranks(2, [TRAIN, QUICKSTART, *tiny(base, "crash", **CRASH_ARGS)], ENV)
    try:
        wait_for_batches(p, 3)  # after the checkpoint at batch 2
        p.kill()
        p.wait(timeout=30)
        deadline = time.monotonic() + 30
        while live_group_members(p.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert live_group_members(p.pid) == []
    finally:
        kill_group(p)
        p.communicate(timeout=60)
    run_ranks(2, [TRAIN, QUICKSTART, *tiny(base, "crash", **CRASH_ARGS)], ENV)
    attempts = rank0_metrics_by_attempt(base / "crash", "loss/train/total")
    assert len(attempts) == 2 and min(attempts[1]) >= 2  # the re-run resumed (from batch 2 or later)
    assert_same_run(tmp_path / "ref" / "crash", base / "crash")


@pytest.mark.slow
def test_damaged_shard_stops_every_rank_with_one_line(tmp_path):
    """The shard check runs on local rank 0 while rank 1 waits; its failure is raised on both ranks (the launcher
    ends, nothing hangs in the gather) as one error line naming the shard."""
    data = tmp_path / "data"
    shutil.copytree(ensure_embedded_corpus(32), data)
    shard = sorted((data / "train").glob("shard.*.mds"))[0]
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    shard.write_bytes(bytes(damaged))
    args = tiny(tmp_path, "bad", **{"train_loader.local": str(data), "eval_loader.local": str(data)})
    p = launch_ranks(2, [TRAIN, QUICKSTART, *args], ENV)
    try:
        out, _ = p.communicate(timeout=300)
    finally:
        kill_group(p)
    assert p.returncode == 2, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("composer-dlm: error:")]
    assert errors == [f"composer-dlm: error: shard {shard} is corrupt: its xxh3_64 hash differs from its index's; "
                      "convert the data again with composer-dlm-convert (or copy the folder again)"]  # fmt: skip
    assert "Traceback" not in out and not (tmp_path / "bad").exists()
