"""The MoE benchmark's reference (dLLM's loop over experts) computes what our grouped path computes, so the
benchmark compares two ways of doing the same work; its shape is LLaDA-MoE's and its FLOPs the one formula."""

from __future__ import annotations

import torch

from composer_dlm.benchmarks.moe import RELEASE_SHAPE, LoopSparseMoE, random_moe
from composer_dlm.models.llada_moe import LLaDAMoEConfig, SparseMoE


def test_loop_reference_equals_grouped_experts():
    config = LLaDAMoEConfig(
        **(RELEASE_SHAPE | {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4}),
        num_hidden_layers=1,
    )
    config.expert_intermediate_size, config.vocab_size = (
        16,
        64,
    )  # tiny widths, the release's expert count and k
    model = random_moe(config, torch.device("cpu"), seed=0)
    moe = model.model.layers[0].mlp
    assert isinstance(moe, SparseMoE)
    x = torch.randn(1, 50, 32)
    ours, _ = moe(x)
    moe.__class__ = LoopSparseMoE
    reference, _ = moe(x)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_flops_count_active_parameters_by_the_shared_formula():
    config = LLaDAMoEConfig(**RELEASE_SHAPE, num_hidden_layers=16)
    active, total = config.num_params(active=True), config.num_params()
    assert 1.0e9 < active < 2.0e9 and 6.5e9 < total < 7.5e9  # "7B-A1B" (about 1.4B active by the paper)
    tokens, seq = 2 * 4096, 4096
    expected = 3 * (
        2 * config.num_params(include_embedding=False, active=True) * tokens + 4 * 16 * 2048 * seq * tokens
    )
    assert config.training_flops(2, seq) == expected
