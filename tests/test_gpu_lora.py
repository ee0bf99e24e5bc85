"""LoRA on CUDA: the frozen base stays bf16 on the GPU while fp32 adapters train (compiled blocks, fused loss,
SFT), and the same under FSDP on two GPUs through Composer's launcher. Figures live in the train benchmark
(``python scripts/benchmark.py train --lora-r 64 ...``), not here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from faults import run_ranks  # noqa: E402
from test_lora import QUICKSTART, base_folder, fit, lora_overrides  # noqa: E402, F401

from composer_dlm.models import LLaDAModel  # noqa: E402

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
GPU_RUN = {
    "precision": "amp_bf16",
    "model.loss_impl": "fused",
    "model.compile_blocks": "true",
    "diffusion.mode": "sft",
    "max_seq_len": "256",
}


def test_base_stays_bf16_and_only_fp32_adapters_train(base_folder, tmp_path):  # noqa: F811
    cfg, trainer, losses = fit(base_folder, tmp_path, **GPU_RUN)
    assert all(torch.isfinite(torch.tensor(losses)))
    base = LLaDAModel.from_pretrained(base_folder).state_dict()  # bf16, as stored
    params = dict(trainer.state.model.model.named_parameters())
    for name, param in params.items():
        assert param.is_cuda, name
        if ".lora_" in name:
            assert param.dtype == torch.float32 and param.requires_grad, name
        else:
            assert param.dtype == torch.bfloat16 and not param.requires_grad, name
            assert torch.equal(param.cpu(), base[name.replace(".base_layer", "")]), name
    optimizer = trainer.state.optimizers[0]
    assert len(optimizer.state) == sum(".lora_" in n for n in params)  # no optimizer state for the base
    trainer.close()


@pytest.mark.world_size(2)
def test_fsdp_two_gpus_trains_adapters_and_exports_merged(base_folder, tmp_path):  # noqa: F811
    """FSDP1 (use_orig_params) with fp32 adapters as their own units beside the bf16 base, checkpointing each
    block; the merged export differs from the base exactly in the adapted weights. (On one GPU FSDP cannot
    shard and LoRA refuses it: tests/test_lora.py.)"""
    nproc = 2
    over = lora_overrides(
        base_folder,
        tmp_path,
        **GPU_RUN,
        **{
            "fsdp.sharding_strategy": "FULL_SHARD",
            "fsdp.activation_checkpointing": "true",
            "fsdp.use_orig_params": "true",
            "callbacks.hf_export.merge": "true",
        },
    )
    run_ranks(nproc, [str(ROOT / "composer_dlm" / "train.py"), str(QUICKSTART), *over])
    merged = LLaDAModel.from_pretrained(tmp_path / "lora" / "hf" / "final").state_dict()
    base = LLaDAModel.from_pretrained(base_folder).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(".blocks." in k for k in changed), sorted(changed)
    ckpt = torch.load(
        tmp_path / "lora" / "checkpoints" / "ep0-ba6-rank0.pt", map_location="cpu", weights_only=False
    )
    assert ckpt["state"]["model"] and all(".lora_" in k for k in ckpt["state"]["model"])


@pytest.mark.world_size(2)
def test_fsdp_two_gpus_trains_moe_adapters_on_the_routed_experts(tmp_path):
    """LLaDA-MoE with LoRA on every target (the routed experts' stacked parameters too) under Composer's FSDP1 on
    two GPUs, bf16, checkpointed blocks: the experts are left out of FSDP and every rank reads the folder (no meta
    start); the run finishes, the checkpoint holds only the adapters, and the merged export differs from the base
    in adapted weights only, the routed experts' among them. (Torch's FSDP1 alone, sharded on two CPU processes:
    tests/test_llada_moe_lora.py.)"""
    from test_llada_moe_lora import moe_lora_overrides, save_moe_base
    from test_llada_moe_train import TINY_MOE

    from composer_dlm.models.llada_moe import LLaDAMoEModel

    base = save_moe_base(tmp_path)
    over = moe_lora_overrides(
        tmp_path,
        base,
        "moe_lora",
        2,
        "precision=amp_bf16",
        "fsdp.sharding_strategy=FULL_SHARD",
        "fsdp.activation_checkpointing=true",
        "fsdp.use_orig_params=true",
        "callbacks.hf_export.merge=true",
    )
    run_ranks(2, [str(ROOT / "composer_dlm" / "train.py"), str(TINY_MOE), *over])
    run = tmp_path / "moe_lora"
    adapters = torch.load(run / "checkpoints" / "ep0-ba2-rank0.pt", map_location="cpu", weights_only=False)[
        "state"
    ]["model"]
    assert adapters and all(".lora_" in k for k in adapters)
    assert (
        sum(".mlp.experts." in k for k in adapters) == 2 * 3 * 2
    )  # 2 MoE layers, 3 stacked parameters, A and B
    merged = LLaDAMoEModel.from_pretrained(tmp_path / "moe_lora" / "hf" / "final").state_dict()
    start = LLaDAMoEModel.from_pretrained(base).state_dict()
    changed = {k for k in start if not torch.equal(start[k], merged[k])}
    assert any(".mlp.experts." in k for k in changed), sorted(changed)
    assert all("_proj" in k for k in changed), sorted(changed)  # never the router, norms or embeddings


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
