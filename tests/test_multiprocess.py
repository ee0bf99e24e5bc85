"""Two processes through Composer's launcher on CPU (gloo, so DDP): the user's path of ``composer -n 2``.

Composer 0.32.1's FSDP cannot run on CPU (it places every FSDP unit on ``torch.cuda.current_device()``), so
here an ``fsdp:`` section runs as DDP; every FSDP mode is run in tests/test_gpu_multigpu.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from faults import ROOT, kill_after_batches, launch_ranks, rank0_metrics, run_ranks
from test_train import tiny_overrides

from composer_dlm.checkpoints import is_complete_checkpoint
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


def test_killed_mid_save_and_mid_run_resumes_bit_identical(tmp_path):
    """Two processes, SIGKILLed while rank 0 writes a checkpoint and again mid-run (the launcher and both ranks
    at once), restarted each time: the final weights equal an uninterrupted two-process run's, bit for bit."""
    args = dict(max_duration=f"{STEPS}ba", eval_interval="1000ba")
    args |= {"checkpoint.save_interval": "2ba", "callbacks.samples": "null", "callbacks.hf_export": "null"}
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

    ref_w, got_w = final_weights(tmp_path / "ref" / "crash"), final_weights(base / "crash")
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        assert torch.equal(ref_w[name], got_w[name]), name
    ref_loss = rank0_metrics(tmp_path / "ref" / "crash", "loss/train/total")
    got_loss = rank0_metrics(base / "crash", "loss/train/total")
    assert sorted(ref_loss) == list(range(STEPS)) and got_loss == ref_loss
