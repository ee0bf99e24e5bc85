"""LoRA on LLaDA-MoE: adapters on the attention projections, the shared expert, dense layers' MLPs and the routed
experts' stacked parameters (peft's ``target_parameters``), checked against a hand computation of
``W + scaling * B @ A`` per expert; a LoRA run through the real trainer trains only the adapters, and its adapter
folder (loaded with peft on the base) and merged export give the trained model's logits."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("peft")

from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.tuners.lora.layer import ParamWrapper  # noqa: E402
from test_llada_moe import TINY  # noqa: E402
from test_llada_moe_train import TINY_MOE, moe_overrides  # noqa: E402
from test_lora import check_adapter_checkpoint, check_exports  # noqa: E402

from composer_dlm import builders  # noqa: E402
from composer_dlm.config import ConfigError, FSDPConfig, load_config  # noqa: E402
from composer_dlm.data import load_tokenizer  # noqa: E402
from composer_dlm.diffusion import DiffusionConfig  # noqa: E402
from composer_dlm.models.composer_llada import ComposerLLaDA  # noqa: E402
from composer_dlm.models.llada_moe import LLaDAMoEModel  # noqa: E402
from composer_dlm.models.lora import (  # noqa: E402
    LoRAConfig,
    apply_lora,
    is_adapter_weight,
    merge_adapters,
    plain_name,
    wrapped_parameters,
)
from composer_dlm.parallel import parallelize, unwrap_llada  # noqa: E402


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


def moe_lora_overrides(tmp_path: Path, base: Path, run: str, batches: int, *more: str) -> list[str]:
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
    cfg = load_config(TINY_MOE, moe_lora_overrides(tmp_path, base, "lora", 3))
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
        TINY_MOE, moe_lora_overrides(tmp_path, base, "bad", 3, "model.lora.target_modules=[attn_out]")
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


def _adapted_moe() -> tuple[ComposerLLaDA, dict[str, torch.Tensor]]:
    """The FSDP tests' case: TINY in bf16 with r=2 adapters on every target, random A and B (so every adapter,
    A included, has a gradient to show), in the ComposerModel that computes the diffusion + router loss; a batch."""
    model = LLaDAMoEModel.from_config(TINY, seed=0)
    apply_lora(model, LoRAConfig(r=2, alpha=4), base_dtype=torch.bfloat16, seed=1)
    _randomise_adapters(model, seed=2)
    composer_model = ComposerLLaDA(
        model, DiffusionConfig(), mask_token_id=TINY["mask_token_id"], loss_impl="plain"
    )
    return composer_model, {
        "input_ids": torch.randint(0, 62, (2, 16), generator=torch.Generator().manual_seed(3))
    }


def _loss_and_grads(
    composer_model: ComposerLLaDA, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.nn.Parameter]]:
    """The loss of one bf16-autocast forward + backward (as Composer runs ``amp_bf16``), and the parameters by
    their plain names, taken before the step (unsharded, FSDP1 leaves frozen units' weights as plain tensors)."""
    params = {plain_name(n): p for n, p in composer_model.model.named_parameters()}
    composer_model.set_noise_step(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = composer_model(batch).loss
    router_loss = unwrap_llada(composer_model).router_loss
    assert router_loss is not None and float(router_loss) > 0  # part of the loss
    loss.backward()
    return loss.detach(), params


def _wrap_for_fsdp(composer_model: ComposerLLaDA) -> dict[str, Any]:
    """``parallelize``'s choice for two processes, checked: every block is a unit, the two MoE layers' routed
    experts are left out; returns the FSDP1 options it implies (units, left-out modules, bf16 compute)."""
    from torch.distributed.fsdp import MixedPrecision

    from composer_dlm.models.llada_moe import GroupedExperts

    config = parallelize(composer_model, FSDPConfig(), on_gpu=True)
    assert config is not None
    left_out = config["fsdp"]["ignored_modules"]
    assert len(left_out) == 2 and all(isinstance(m, GroupedExperts) for m in left_out)
    mixed = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    return {"mixed_precision": mixed, "ignored_modules": left_out}


def _check_grads(got: Mapping[str, torch.Tensor | None], want: Mapping[str, torch.Tensor | None]) -> None:
    """Exactly the adapters have gradients, fp32, equal to ``want`` within the bf16 reduction's rounding; the
    routed experts' adapters (2 MoE layers x 3 stacked parameters x A and B) nonzero."""
    assert got.keys() == want.keys()
    for name, grad in got.items():
        if not is_adapter_weight(name):
            assert grad is None, name
            continue
        assert grad is not None and grad.dtype == torch.float32, name
        torch.testing.assert_close(grad, want[name], rtol=2**-7, atol=0, msg=name)
    experts = [n for n in got if ".mlp.experts." in n and is_adapter_weight(n)]
    assert len(experts) == 2 * 3 * 2 and all(got[n].abs().sum() > 0 for n in experts)


def test_fsdp_wraps_a_block_per_unit_and_trains_the_expert_adapters(tmp_path, monkeypatch):
    """``parallelize``'s FSDP choice for LoRA on LLaDA-MoE (attention, dense MLP, shared expert and the routed
    experts' stacked parameters) with torch's FSDP1 itself, in one CPU process (gloo: NO_SHARD), bf16 base, bf16
    autocast: it wraps (one dtype per unit); the diffusion loss plus the router losses equals the unwrapped model's
    bit for bit (NO_SHARD and the same bf16 casts: nothing is reordered); exactly the adapters get gradients (see
    ``_check_grads``). With peft's parameter adapters as units of their own (the dense layout), peft's
    parametrize fails on FSDP's flat-parameter views in the first forward."""
    from test_lora import fsdp1_on_one_process
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from composer_dlm import parallel

    composer_model, batch = _adapted_moe()
    want_loss, want = _loss_and_grads(composer_model, batch)
    want_grads = {n: p.grad for n, p in want.items()}
    composer_model.zero_grad(set_to_none=True)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 2)  # as on rank 0 of two (see test_lora)
    model = composer_model.model
    with fsdp1_on_one_process(model, tmp_path, **_wrap_for_fsdp(composer_model)) as wrapped:
        assert all(isinstance(block, FSDP) for block in model.model.layers)
        composer_model.model = wrapped  # as Composer wraps ComposerLLaDA's child
        loss, params = _loss_and_grads(composer_model, batch)
    assert torch.equal(loss, want_loss)
    _check_grads({n: p.grad for n, p in params.items()}, want_grads)


def _sharded_rank(rank: int, tmp: str) -> None:
    """One of two gloo processes: the unwrapped model's loss and gradients, then the same model FULL_SHARD-ed by
    torch's FSDP1 as ``parallelize`` chose, each block checkpointed as Composer does (non-reentrant)."""
    import functools

    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    composer_model, batch = _adapted_moe()
    want_loss, want = _loss_and_grads(composer_model, batch)
    want_grads = {n: p.grad for n, p in want.items()}
    composer_model.zero_grad(set_to_none=True)
    model = composer_model.model
    options = _wrap_for_fsdp(composer_model)
    wrapped = FSDP(
        model,
        auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=model.fsdp_wrap_fn),
        use_orig_params=True,
        device_id=torch.device("cpu"),
        **options,
    )
    no_reentrant = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    apply_activation_checkpointing(
        wrapped, checkpoint_wrapper_fn=no_reentrant, check_fn=model.activation_checkpointing_fn
    )
    composer_model.model = wrapped
    loss, params = _loss_and_grads(composer_model, batch)
    assert torch.equal(loss, want_loss), (loss, want_loss)
    # Sharded: each rank holds a slice of each adapter and of its gradient (the mean over the 2 equal batches)
    assert any(p.numel() != want_grads[n].numel() for n, p in params.items() if is_adapter_weight(n))
    with FSDP.summon_full_params(wrapped, with_grads=True):
        _check_grads({n: p.grad for n, p in params.items() if n in want}, want_grads)
    dist.destroy_process_group()


@pytest.mark.slow  # about 35 s: two processes
@pytest.mark.world_size(2)
def test_fsdp_full_shard_on_two_processes_gathers_the_expert_adapters(tmp_path):
    """Sharded (two CPU processes, gloo, FULL_SHARD, checkpointed blocks), where a parameter adapter read outside
    its own unit's forward would be a shard: the loss equals the unwrapped model's bit for bit on both ranks, and
    the gathered gradients are the unwrapped ones (``_check_grads``)."""
    torch.multiprocessing.spawn(_sharded_rank, args=(str(tmp_path),), nprocs=2)


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
    args = moe_lora_overrides(tmp_path, base, "lora2", 2)
    run_ranks(2, [str(ROOT / "composer_dlm" / "train.py"), str(TINY_MOE), *args], {"TRITON_INTERPRET": "0"})
    run = tmp_path / "lora2"
    assert len(list((run / "logs").glob("rank1-*.txt"))) == 1
    adapters = check_adapter_checkpoint(run, "ep0-ba2-rank0.pt")
    assert (
        sum(".mlp.experts." in k for k in adapters) == 2 * 3 * 2
    )  # 2 MoE layers, 3 stacked parameters, A and B
