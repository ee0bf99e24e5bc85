"""LoRA on LLaDA-MoE: adapters on the attention projections, the shared expert, dense layers' MLPs and the routed
experts' stacked parameters (peft's ``target_parameters``), checked against a hand computation of
``W + scaling * B @ A`` per expert; a LoRA run through the real trainer trains only the adapters, and its adapter
folder (loaded with peft on the base) and merged export give the trained model's logits."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.tuners.lora.layer import ParamWrapper  # noqa: E402
from test_llada_moe import TINY  # noqa: E402
from test_llada_moe_train import TINY_MOE, moe_overrides  # noqa: E402
from test_lora import check_adapter_checkpoint, check_exports  # noqa: E402

from composer_dlm import builders  # noqa: E402
from composer_dlm.config import ConfigError, load_config  # noqa: E402
from composer_dlm.data import load_tokenizer  # noqa: E402
from composer_dlm.models.llada_moe import LLaDAMoEModel  # noqa: E402
from composer_dlm.models.lora import (  # noqa: E402
    LoRAConfig,
    apply_lora,
    is_adapter_weight,
    merge_adapters,
    plain_name,
    wrapped_parameters,
)


def _randomise_adapters(model: torch.nn.Module, seed: int) -> None:
    """B starts at zero (the adapted model equals the base); random A and B make the deltas visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)


def test_lora_forward_equals_base_plus_scaled_b_a_per_expert():
    model = LLaDAMoEModel.from_config(TINY, seed=0).eval()
    hand = copy.deepcopy(model)
    cfg = LoRAConfig(r=2, alpha=6)
    apply_lora(model, cfg, base_dtype=torch.float32, seed=1)
    _randomise_adapters(model, seed=2)

    # The hand computation, layer by layer, from the adapters peft holds: a linear layer's W + 3 * B @ A; a stacked
    # (E, out, in) expert parameter's W_e + 3 * B_e @ A_e, with expert e's rows e*r..e*r+r-1 of A and its columns
    # e, e + E of B (r = 2).
    weights = dict(hand.named_parameters())
    adapted: list[str] = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            if isinstance(module, ParamWrapper):
                target = f"{name.replace('.base_layer', '')}.{module.parameter_name}"
                w = weights[target]
                experts = w.shape[0]
                for e in range(experts):
                    a_e = a[[e * 2, e * 2 + 1]]
                    b_e = b[:, [e, e + experts]]
                    w[e] += 3.0 * b_e @ a_e
            else:
                target = f"{name}.weight"
                weights[target] += 3.0 * b @ a
            adapted.append(target)
    # Attention (4 per layer, 3 layers), the dense layer's MLP, the shared expert's and the routed experts' three
    # projections in the two MoE layers; never the router (mlp.gate) nor the output head.
    assert len(adapted) == 4 * 3 + 3 + 2 * 3 + 2 * 3
    assert not any(t.endswith("mlp.gate.weight") or t.startswith("lm_head") for t in adapted)
    assert sum(".mlp.experts." in t for t in adapted) == 6

    ids = torch.randint(0, 62, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, expected, base = model(ids), hand(ids), LLaDAMoEModel.from_config(TINY, seed=0)(ids)
        assert (ours - base).abs().max() > 1e-2  # the adapters change the output
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
        # merge_adapters (what a merged export writes) gives the same network.
        merged = LLaDAMoEModel(model.config)
        merged.load_state_dict(merge_adapters(model.state_dict(), cfg, wrapped_parameters(model)))
        torch.testing.assert_close(merged(ids), expected, rtol=0, atol=1e-5)


def test_dense_names_and_dropout_on_experts_are_refused():
    model = LLaDAMoEModel.from_config(TINY, seed=0)
    with pytest.raises(ValueError, match="'attn_out' not LLaDAMoE layer name"):
        apply_lora(copy.deepcopy(model), LoRAConfig(target_modules=["attn_out"]), base_dtype=torch.float32)
    with pytest.raises(ValueError, match="dropout must be 0"):
        apply_lora(copy.deepcopy(model), LoRAConfig(dropout=0.1), base_dtype=torch.float32)
    # Attention only: dropout is fine there.
    apply_lora(model, LoRAConfig(dropout=0.1, target_modules=["q_proj", "v_proj"]), base_dtype=torch.float32)
    assert not any(isinstance(m, ParamWrapper) for m in model.modules())


def save_moe_base(tmp_path: Path) -> Path:
    """A tiny LLaDA-MoE of llada_moe_tiny.yaml's test shape saved as the release is (bf16 safetensors)."""
    base = tmp_path / "base"
    config = load_config(TINY_MOE, moe_overrides(tmp_path)).model.config
    assert config is not None
    LLaDAMoEModel.from_config(config, seed=1).save_pretrained(base, dtype=torch.bfloat16)
    return base


def lora_overrides(tmp_path: Path, base: Path, run: str, batches: int, *more: str) -> list[str]:
    """``moe_overrides`` for a LoRA run (r 4, every target) on ``base`` of ``batches`` batches, one checkpoint."""
    extra = {
        "model.config": "null",
        "model.pretrained": str(base),
        "model.lora.r": "4",
        "model.lora.alpha": "8",
        "max_duration": f"{batches}ba",
        "eval_interval": f"{batches}ba",
        "checkpoint.save_interval": f"{batches}ba",
        "optimizer.lr": "1e-2",
        "optimizer.weight_decay": "0.0",
    }
    return [*moe_overrides(tmp_path, run), *(f"{k}={v}" for k, v in extra.items()), *more]


def test_lora_run_trains_adapters_only_and_both_exports_give_its_logits(tmp_path: Path):
    base = save_moe_base(tmp_path)
    cfg = load_config(TINY_MOE, lora_overrides(tmp_path, base, "lora", 3))
    trainer = builders.build_trainer(cfg)
    trainer.fit()
    trained = trainer.state.model.model
    assert isinstance(trained, LLaDAMoEModel)

    # Only adapters train; every other tensor still equals the folder's; every B moved off zero.
    base_state = LLaDAMoEModel.from_pretrained(base, dtype=torch.float32).state_dict()
    names = dict(trained.named_parameters())
    for name, param in names.items():
        if ".lora_" in name:
            assert param.requires_grad and param.dtype == torch.float32, name
        else:
            assert not param.requires_grad
            assert torch.equal(param, base_state[name.replace(".base_layer", "")]), name
    lora_b = [n for n in names if ".lora_B." in n]
    assert sum(".mlp.experts." in n for n in lora_b) == 2 * 3  # routed experts of both MoE layers
    assert all(names[n].abs().sum() > 0 for n in lora_b)
    ckpt = torch.load(cfg.checkpoint_folder / "ep0-ba3-rank0.pt", weights_only=False, map_location="cpu")
    assert all(".lora_" in k for k in ckpt["state"]["model"])

    ids = torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = trained(ids)
        check_exports(trainer, cfg.run_folder, base, tmp_path, ids, reference)
    trainer.close()

    # A LLaDA name on an MoE base: one line naming the valid ones.
    bad = load_config(
        TINY_MOE, lora_overrides(tmp_path, base, "bad", 3, "model.lora.target_modules=[attn_out]")
    )
    with pytest.raises(ConfigError, match="model.lora: target_modules: .attn_out. not LLaDAMoE layer name"):
        builders.build_model(bad, load_tokenizer(bad.tokenizer.name))


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
)  # CUDA: torch's grouped GEMM where the torch has it, else the Triton one
def test_lora_on_grouped_experts_in_bf16_autocast(device):
    """Under bf16 autocast the adapted model's logits are as close to the merged weights' fp32 logits
    (``merge_adapters``) as the merged model's own bf16 logits are: the adapters add no error beyond bf16's (a
    tiny random model is far from its fp32 logits in bf16, a few percent, so the bound is relative to that);
    every adapter gets a finite, non-zero gradient and the frozen base none. Every expert is routed to (top-k =
    all), so that a rounding cannot switch a token's experts."""
    shape = TINY | {"hidden_size": 64, "expert_intermediate_size": 32, "shared_expert_intermediate_size": 32}
    shape["num_experts_per_tok"] = shape["num_experts"]
    model = LLaDAMoEModel.from_config(shape, seed=0).to(device)
    cfg = LoRAConfig(r=4, alpha=8)
    apply_lora(model, cfg, base_dtype=torch.bfloat16, seed=1)
    _randomise_adapters(model, seed=2)
    merged = LLaDAMoEModel(model.config).to(device)
    merged.load_state_dict(merge_adapters(model.state_dict(), cfg, wrapped_parameters(model)))
    unadapted = LLaDAMoEModel(model.config).to(device)
    unadapted.load_state_dict(
        {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if not is_adapter_weight(k)}
    )
    ids = torch.randint(0, 62, (4, 256), generator=torch.Generator().manual_seed(3)).to(device)
    probe = torch.randn(4, 256, 64, generator=torch.Generator().manual_seed(4)).to(device)
    with torch.no_grad():
        want = merged(ids).float()
        without_adapters = unadapted(ids).float()
    with torch.autocast(device, dtype=torch.bfloat16):
        ours = model(ids).float()
        with torch.no_grad():
            merged_bf16 = merged(ids).float()

    def rel(a: torch.Tensor) -> float:
        return ((a - want).norm() / want.norm()).item()

    assert rel(ours) <= 1.25 * rel(merged_bf16)
    assert rel(without_adapters) > 4 * rel(
        merged_bf16
    )  # the adapters change the logits far beyond that error
    (ours * probe).sum().backward()
    for name, param in model.named_parameters():
        if ".lora_" in name:
            assert (
                param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
            ), name
        else:
            assert param.grad is None, name


def test_fsdp_wraps_a_block_per_unit_and_trains_the_expert_adapters(tmp_path, monkeypatch):
    """``parallelize``'s FSDP choice for LoRA on LLaDA-MoE (attention, dense MLP, shared expert and the routed
    experts' stacked parameters), run with torch's FSDP1 itself (one CPU process, gloo: NO_SHARD) under bf16
    autocast over a bf16 base, as Composer runs ``amp_bf16``: every block is a unit, it wraps (one dtype per unit),
    the diffusion loss plus the router losses equals the unwrapped model's bit for bit (NO_SHARD and the same bf16
    casts: nothing is reordered), and exactly the adapters get gradients, the routed experts' nonzero and equal to
    the unwrapped model's within the bf16 gradient reduction's rounding. With peft's parameter adapters as units of
    their own (the dense layout), peft's parametrize fails on FSDP's flat-parameter views in the first forward."""
    from test_lora import fsdp1_on_one_process
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision

    from composer_dlm import parallel
    from composer_dlm.config import FSDPConfig
    from composer_dlm.diffusion import DiffusionConfig
    from composer_dlm.models.composer_llada import ComposerLLaDA
    from composer_dlm.models.llada_moe import GroupedExperts

    model = LLaDAMoEModel.from_config(TINY, seed=0)
    apply_lora(model, LoRAConfig(r=2, alpha=4), base_dtype=torch.bfloat16, seed=1)
    _randomise_adapters(model, seed=2)  # B off zero, so every adapter (A included) has a gradient to show
    composer_model = ComposerLLaDA(
        model, DiffusionConfig(), mask_token_id=TINY["mask_token_id"], loss_impl="plain"
    )
    batch = {"input_ids": torch.randint(0, 62, (2, 16), generator=torch.Generator().manual_seed(3))}

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        # Taken before the step: unsharded, FSDP1 leaves the frozen units' weights as plain tensors after it
        params = {plain_name(n): p for n, p in composer_model.model.named_parameters()}
        composer_model.set_noise_step(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = composer_model(batch).loss
        assert model.router_loss is not None and float(model.router_loss) > 0  # part of the loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in params.items()}

    want_loss, want_grads = loss_and_grads()
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 2)  # as on rank 0 of two (see test_lora)
    config = parallel.parallelize(composer_model, FSDPConfig(), on_gpu=True)
    assert config is not None
    left_out = config["fsdp"]["ignored_modules"]
    assert len(left_out) == 2 and all(isinstance(m, GroupedExperts) for m in left_out)  # the 2 MoE layers'
    mixed = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    with fsdp1_on_one_process(model, tmp_path, mixed_precision=mixed, ignored_modules=left_out) as wrapped:
        assert all(isinstance(block, FSDP) for block in model.model.layers)
        composer_model.model = wrapped  # as Composer wraps ComposerLLaDA's child
        loss, grads = loss_and_grads()
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys()
    expert_adapters = [n for n in grads if ".mlp.experts." in n and ".lora_" in n]
    assert len(expert_adapters) == 2 * 3 * 2  # 2 MoE layers, 3 stacked parameters, A and B
    for name, grad in grads.items():
        if not is_adapter_weight(name):
            assert grad is None, name
            continue
        assert grad is not None and grad.dtype == torch.float32, name
        torch.testing.assert_close(grad, want_grads[name], rtol=2**-7, atol=0, msg=name)
    assert all(grads[n].abs().sum() > 0 for n in expert_adapters)


def test_every_rank_reads_the_base_when_fsdp_leaves_the_adapted_experts_out(tmp_path, monkeypatch):
    """Under FSDP ranks but each node's first start on the meta device and get the weights from FSDP's broadcast,
    which skips the modules FSDP leaves out: with LoRA on the routed experts every rank reads the folder; with
    attention-only LoRA (or on a dense base) the meta start stays."""
    from composer_dlm import builders

    base = tmp_path / "base"
    LLaDAMoEModel.from_config(TINY, seed=0).save_pretrained(base, dtype=torch.bfloat16)
    monkeypatch.setattr(builders.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(builders.dist, "get_local_rank", lambda: 1)

    def receives(*over: str) -> bool:
        extra = ["model.config=null", f"model.pretrained={base}", "fsdp.sharding_strategy=FULL_SHARD", *over]
        return builders.receives_weights(load_config(TINY_MOE, [*moe_overrides(tmp_path), *extra]))

    assert receives()  # a full fine-tune
    assert not receives("model.lora.r=4")  # all targets: the experts' too
    assert not receives("model.lora.target_modules=[q_proj,down_proj]")
    assert receives("model.lora.target_modules=[q_proj,v_proj]")


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_two_processes_through_the_launcher(tmp_path):
    """``composer -n 2`` on CPU (gloo, DDP) fine-tunes LoRA on every target of a bf16 MoE folder for 2 batches:
    both ranks finish; the checkpoint holds only the adapters (the routed experts' among them), the adapter
    export the same tensors."""
    from faults import ROOT, run_ranks

    base = save_moe_base(tmp_path)
    args = lora_overrides(tmp_path, base, "lora2", 2)
    run_ranks(2, [str(ROOT / "composer_dlm" / "train.py"), str(TINY_MOE), *args], {"TRITON_INTERPRET": "0"})
    run = tmp_path / "lora2"
    assert len(list((run / "logs").glob("rank1-*.txt"))) == 1
    adapters = check_adapter_checkpoint(run, "ep0-ba2-rank0.pt")
    assert (
        sum(".mlp.experts." in k for k in adapters) == 2 * 3 * 2
    )  # 2 MoE layers, 3 stacked parameters, A and B
