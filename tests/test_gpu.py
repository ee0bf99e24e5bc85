"""GPU end to end (skipped without CUDA): bf16 autocast, the fused Triton loss and compiled blocks in a real run."""

from __future__ import annotations

import copy

import pytest
import torch
from test_train import fit

from composer_dlm.diffusion import DiffusionConfig
from composer_dlm.models import LLaDAModel
from composer_dlm.models.composer_llada import ComposerLLaDA

pytestmark = pytest.mark.gpu


def test_fused_and_plain_losses_agree_in_bf16():
    base = LLaDAModel.from_config(
        dict(d_model=256, n_layers=2, n_heads=4, vocab_size=50000, mlp_hidden_size=512, mask_token_id=49999),
        seed=0,
    ).cuda()
    cfg = DiffusionConfig(random_length_prob=0.0)
    plain = ComposerLLaDA(copy.deepcopy(base), cfg, loss_impl="plain")
    fused = ComposerLLaDA(copy.deepcopy(base), cfg, loss_impl="fused")
    batch = {"input_ids": torch.randint(0, 49000, (4, 512), device="cuda")}
    outs = []
    for m in (plain, fused):
        m.set_noise_step(3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(batch)
        out.loss.backward()
        outs.append(out)
    assert outs[1].loss.item() == pytest.approx(outs[0].loss.item(), rel=2e-3)
    assert outs[1].num_masked.item() == outs[0].num_masked.item()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        err = (p.grad - q.grad).norm() / p.grad.norm()
        assert err < 2e-2, (name, err.item())


def test_gpu_run_with_fused_loss_and_compiled_blocks(tmp_path):
    _, trainer, losses = fit(
        tmp_path,
        **{
            "precision": "amp_bf16",
            "model.loss_impl": "fused",
            "model.compile_blocks": "true",
            "model.config.d_model": "128",
            "model.config.n_heads": "4",
            "max_duration": "12ba",
            "optimizer.lr": "3e-3",
            "scheduler.t_warmup": "0ba",
        },
    )
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
