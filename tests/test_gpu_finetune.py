"""Fine-tuning a bf16 release-style folder under FSDP FULL_SHARD on GPUs, through Composer's launcher (the GPU
machine has no ``composer`` on PATH: ``python -m composer.cli.launcher``). Ranks other than local rank 0 build
the model on the meta device and receive the weights from FSDP's broadcast (``fsdp.sync_module_states``).

    python -m pytest tests/test_gpu_finetune.py -m gpu -q
"""

from __future__ import annotations

import json

import pytest
import torch
from faults import ROOT, launch_ranks
from test_finetune import finetune_overrides, write_release_folder
from test_hf_format import LLADA_RELEASE_KEYS

from composer_dlm.models import LLaDAModel
from composer_dlm.models.composer_llada import llada_weights

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("nproc", [1, 2])
def test_fsdp_full_shard_finetune_keeps_fp32_masters(tmp_path, nproc):
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs")
    release = write_release_folder(tmp_path / "release")
    start = {k: v.float() for k, v in LLaDAModel.from_pretrained(release).state_dict().items()}
    overrides = finetune_overrides(
        tmp_path,
        release,
        **{
            "fsdp": "{sharding_strategy: FULL_SHARD}",
            "precision": "amp_bf16",
            "device_train_microbatch_size": "4",
        },
    )
    train = str(ROOT / "composer_dlm" / "train.py")
    quickstart = str(ROOT / "yamls" / "quickstart.yaml")
    p = launch_ranks(nproc, [train, quickstart, *overrides], env={"TRITON_INTERPRET": "0"})
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-4000:]

    ckpt = torch.load(
        tmp_path / "ft" / "checkpoints" / "latest-rank0.pt", map_location="cpu", weights_only=False
    )
    params = llada_weights(ckpt["state"]["model"])
    assert set(params) == set(start)
    assert {v.dtype for v in params.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in params.values()), "a rank trained on unsynced (NaN) weights"
    moved = sum(int((params[k] != start[k]).sum()) for k in start)
    total = sum(v.numel() for v in start.values())
    assert moved / total > 0.9, f"only {moved / total:.1%} of weight elements changed"

    export = tmp_path / "ft" / "hf" / "final"
    written = json.loads((export / "config.json").read_text())
    assert {k: written[k] for k in LLADA_RELEASE_KEYS} == LLADA_RELEASE_KEYS
    exported = LLaDAModel.from_pretrained(export, dtype=torch.float32)
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, params[name].to(torch.bfloat16).float()), name
