"""LLaDA-MoE against dLLM's modeling code (a fixture made with it), its folder format, the grouped expert
dispatch against a per-expert loop, and the router losses against a direct computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from composer_dlm.models.hf_format import CheckpointError
from composer_dlm.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModel, SparseMoE, router_losses
from kernels.grouped_mm import grouped_mm, grouped_mm_reference

FIXTURE = Path(__file__).parent / "fixtures" / "lladamoe"
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "num_experts": 5,
    "num_experts_per_tok": 2,
    "expert_intermediate_size": 16,
    "dense_intermediate_size": 48,
    "shared_expert_intermediate_size": 24,
    "moe_layer_freq": [0, 1, 1],
    "mask_token_id": 63,
    "eos_token_id": 62,
}


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "logits.safetensors"))


def test_logits_equal_dllms_on_its_checkpoint(reference):
    model = LLaDAMoEModel.from_pretrained(FIXTURE / "checkpoint", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(reference["input_ids"])
        masked = model(reference["input_ids"], reference["attention_mask"])
    assert (logits - reference["logits"]).abs().max() < 1e-5
    assert (masked - reference["logits_masked"]).abs().max() < 1e-5


def test_export_has_the_release_names_and_keys_and_the_same_logits(tmp_path, reference):
    model = LLaDAMoEModel.from_pretrained(FIXTURE / "checkpoint", dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "export", dtype=torch.float32)
    with safe_open(str(FIXTURE / "checkpoint" / "model.safetensors"), "pt") as f:
        release_names = set(f.keys())
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == release_names
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    release = json.loads((FIXTURE / "checkpoint" / "config.json").read_text())
    for key in ("model_type", "architectures", "moe_layer_freq", "num_experts", "qk_layernorm", "hidden_act"):
        assert exported[key] == release[key], key
    reloaded = LLaDAMoEModel.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (reloaded(reference["input_ids"]) - reference["logits"]).abs().max() < 1e-5


def test_tied_embeddings_export_without_lm_head(tmp_path):
    model = LLaDAMoEModel.from_config(TINY | {"tie_word_embeddings": True}, seed=3)
    model.save_pretrained(tmp_path / "tied", dtype=torch.float32)
    with safe_open(str(tmp_path / "tied" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    reloaded = LLaDAMoEModel.from_pretrained(tmp_path / "tied")
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))


def test_missing_expert_and_unsupported_keys_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="rope_scaling"):
        LLaDAMoEConfig.from_dict(TINY | {"rope_scaling": {"type": "linear", "factor": 2.0}})
    LLaDAMoEModel.from_config(TINY, seed=0).save_pretrained(tmp_path / "ok", dtype=torch.float32)
    weights = tmp_path / "ok" / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(
        CheckpointError, match="missing from the safetensors: model.layers.1.mlp.experts.up_proj"
    ):
        LLaDAMoEModel.from_pretrained(tmp_path / "ok")


def _loop_moe(moe: SparseMoE, x_NH: torch.Tensor) -> torch.Tensor:
    """dLLM's formulation: softmax router (+ bias), top-k unnormalised, one expert at a time, index_add."""
    probs = F.softmax(moe.gate(x_NH), dim=1, dtype=torch.float)
    if moe.expert_bias is not None:
        probs = probs + moe.expert_bias
    weights, chosen = torch.topk(probs, moe.top_k, dim=-1)
    out = torch.zeros_like(x_NH)
    w = moe.experts
    for e in range(moe.num_experts):
        token, slot = torch.where(chosen == e)
        h = x_NH[token]
        y = (F.silu(h @ w.gate_proj[e].T) * (h @ w.up_proj[e].T)) @ w.down_proj[e].T
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_grouped_dispatch_equals_a_loop_over_experts_with_gradients(tokens):
    model = LLaDAMoEModel.from_config(TINY | {"moe_router_enable_expert_bias": True}, seed=5)
    moe = model.model.layers[1].mlp
    assert isinstance(moe, SparseMoE)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.05, -0.02, 0.0, 0.1, -0.1]))
    x = torch.randn(1, tokens, 32, requires_grad=True)
    ours, _ = moe(x)
    ref = _loop_moe(moe, x.view(tokens, 32))
    torch.testing.assert_close(ours.view(tokens, 32), ref, rtol=1e-5, atol=1e-6)
    probe = torch.randn(tokens, 32)
    grads = torch.autograd.grad(
        (ours.view(tokens, 32) * probe).sum(), [x, moe.experts.up_proj, moe.gate.weight]
    )
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x, moe.experts.up_proj, moe.gate.weight])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_grouped_mm_matches_the_per_group_products():
    x = torch.randn(10, 8)
    w = torch.randn(3, 5, 8)
    ends = torch.tensor([3, 3, 9])  # an empty group, and a padding row at the end
    out = grouped_mm(x, w, ends)
    expect = torch.cat([x[:3] @ w[0].T, x[3:9] @ w[2].T, torch.zeros(1, 5)])
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(grouped_mm_reference(x, w, ends), expect)


def test_router_losses_equal_the_switch_formula_over_all_layers():
    torch.manual_seed(0)
    num_experts, top_k, tokens = 5, 2, 9
    logits = [torch.randn(tokens, num_experts) for _ in range(2)]
    config = LLaDAMoEConfig(**(TINY | {"num_experts": num_experts, "num_experts_per_tok": top_k}))
    moe = SparseMoE(config)
    balance, z = router_losses(torch.stack([moe.router_statistics(x) for x in logits]), num_experts, tokens)
    every = torch.cat(
        logits
    )  # all layers' router logits together, as dLLM's load_balancing_loss_func takes them
    probs = every.softmax(-1)
    chosen = F.one_hot(probs.topk(top_k, -1).indices, num_experts).float()  # (rows, k, E)
    expected = num_experts * (chosen.mean(0) * probs.mean(0)[None]).sum()
    torch.testing.assert_close(balance, expected)
    torch.testing.assert_close(z, (torch.logsumexp(every, -1) ** 2).mean())


def test_training_forward_sets_the_weighted_router_loss_and_inference_does_not():
    model = LLaDAMoEModel.from_config(TINY, seed=2)
    ids = torch.randint(0, 64, (2, 6))
    model(ids)
    assert model.router_loss is not None and model.router_loss.requires_grad and model.router_loss > 0
    with torch.no_grad():
        model(ids)
    assert model.router_loss is None


def test_active_parameters_count_top_k_experts():
    config = LLaDAMoEConfig(**TINY)
    total = sum(p.numel() for p in LLaDAMoEModel.from_config(config).parameters())
    assert config.num_params() == total
    expert = 3 * 32 * 16
    assert config.num_params() - config.num_params(active=True) == 2 * (5 - 2) * expert


def test_likelihood_of_a_one_token_answer_is_exact_through_the_shared_interface():
    from composer_dlm.likelihood import mc_log_likelihood

    model = LLaDAMoEModel.from_config(TINY, seed=4).eval()
    prompt, answer = torch.tensor([3, 9, 27, 5]), torch.tensor([11])
    estimate = mc_log_likelihood(model, prompt, answer, mask_token_id=63, num_samples=1, batch_size=1)
    with torch.no_grad():
        logits = model(torch.cat([prompt, torch.tensor([63])])[None])
    assert estimate == pytest.approx(float(logits[0, -1].log_softmax(-1)[11]), abs=1e-5)


def test_fast_mode_threshold_decodes_and_its_cache_is_refused_in_one_line():
    from composer_dlm.generate import FastMode, generate

    model = LLaDAMoEModel.from_config(TINY, seed=5).eval()
    prompt = torch.tensor([[3, 9, 27, 5]])
    out = generate(
        model, prompt, steps=4, gen_length=8, block_length=8, mask_token_id=63, fast=FastMode(threshold=0.9)
    )
    assert out.shape == (1, 12) and torch.equal(out[:, :4], prompt) and not (out == 63).any()
    with pytest.raises(ValueError) as err:
        generate(
            model,
            prompt,
            steps=4,
            gen_length=8,
            block_length=8,
            mask_token_id=63,
            fast=FastMode(cache="dual"),
        )
    message = str(err.value)
    assert "\n" not in message and "LLaDAMoEModel" in message and "leave the cache unset" in message


@pytest.mark.gpu
def test_grouped_experts_on_the_gpu_match_the_loop_in_bf16_autocast():
    """torch's grouped GEMM (where the torch has it) against dLLM's loop, forward and gradients, bf16 autocast."""
    model = LLaDAMoEModel.from_config(
        TINY | {"hidden_size": 64, "expert_intermediate_size": 32}, seed=6
    ).cuda()
    moe = model.model.layers[1].mlp
    assert isinstance(moe, SparseMoE)
    x = torch.randn(2, 300, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours, _ = moe(x)
        ref = _loop_moe(moe, x.view(600, 64))
    torch.testing.assert_close(ours.view(600, 64).float(), ref.float(), rtol=2e-2, atol=2e-3)
    probe = torch.randn(600, 64, device="cuda")
    got = torch.autograd.grad((ours.view(600, 64).float() * probe).sum(), [x, moe.experts.down_proj])
    want = torch.autograd.grad((ref.float() * probe).sum(), [x, moe.experts.down_proj])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-3)
