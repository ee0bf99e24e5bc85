"""LoRA through the real entry point: a bf16 release-style folder as the base, Composer runs on the embedded
corpus, adapter-only checkpoints, exact kill-and-resume, and the adapter / merged exports checked against peft."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from test_train import LossTrace  # noqa: E402

from composer_dlm import builders, generate_cli, train  # noqa: E402
from composer_dlm.callbacks.hf_export import HuggingFaceExport  # noqa: E402
from composer_dlm.config import load_config  # noqa: E402
from composer_dlm.data import load_tokenizer, mask_token_id  # noqa: E402
from composer_dlm.models import LLaDAModel  # noqa: E402
from composer_dlm.models.architectures import AnyModel, from_pretrained  # noqa: E402
from composer_dlm.models.lora import TARGETS, load_merged, merge_adapters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "yamls" / "quickstart.yaml"


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """A tiny LLaDA saved as the release is: bf16 safetensors + config.json, untied output head."""
    tokenizer = load_tokenizer("embedded")
    model = LLaDAModel.from_config(
        {
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 2,
            "mlp_hidden_size": 64,
            "vocab_size": 4096,
            "max_sequence_length": 256,
            "weight_tying": False,
            "mask_token_id": mask_token_id(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
        },
        seed=3,
    )
    folder = tmp_path_factory.mktemp("base") / "llada-tiny"
    model.save_pretrained(folder, dtype=torch.bfloat16)
    return folder


def lora_overrides(base: Path, run_root: Path, **extra: str) -> list[str]:
    over = {
        "base_path": str(run_root),
        "run_name": "lora",
        "model.config": "null",
        "model.pretrained": str(base),
        "model.loss_impl": "plain",
        "model.lora.r": "4",
        "model.lora.alpha": "8",
        "model.lora.target_modules": "[" + ",".join(TARGETS) + "]",
        "max_seq_len": "32",
        "global_train_batch_size": "8",
        "device_train_microbatch_size": "4",
        "max_duration": "6ba",
        "eval_interval": "100ba",
        "checkpoint.save_interval": "2ba",
        "checkpoint.save_num_checkpoints_to_keep": "-1",
        "callbacks.samples": "null",
        "train_loader.num_workers": "0",
        "eval_loader": "null",
        "optimizer.lr": "1e-2",
        "optimizer.weight_decay": "0.0",
        "logging.console_interval": "1ba",
    } | extra
    return [f"{k}={v}" for k, v in over.items()]


def fit(base: Path, run_root: Path, **extra: str):
    cfg = load_config(QUICKSTART, lora_overrides(base, run_root, **extra))
    trace = LossTrace()
    trainer = builders.build_trainer(cfg, extra_callbacks=[trace])
    trainer.fit()
    return cfg, trainer, trace.losses


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def check_exports(
    trainer: Any,
    run_folder: Path,
    base_folder: Path,
    tmp_path: Path,
    ids: torch.Tensor,
    reference: torch.Tensor,
) -> Path:
    """A LoRA run's exports give the trained model's ``reference`` logits on ``ids``: the adapter folder (fit_end
    export, returned) loaded with peft on the base, the merged export, and the merge-on-load path that
    scripts/generate.py uses for an adapter folder."""
    final = run_folder / "hf" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = PeftModel.from_pretrained(from_pretrained(base_folder, dtype=torch.float32), final)
    torch.testing.assert_close(peft_model(ids), reference, rtol=0, atol=1e-6)
    HuggingFaceExport(tmp_path / "hf", dtype=torch.float32, merge=True).export(trainer.state, tmp_path / "m")
    exported = from_pretrained(tmp_path / "m", dtype=torch.float32)
    torch.testing.assert_close(exported(ids), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(load_merged(final)(ids), reference, rtol=0, atol=1e-5)
    return final


def test_only_adapters_train_and_both_exports_match_the_adapter_model(base_folder, tmp_path, capsys):
    cfg, trainer, losses = fit(
        base_folder, tmp_path, **{"diffusion.mode": "sft", "max_seq_len": "256", "model.loss_impl": "fused"}
    )
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    trained = trainer.state.model.model
    base = LLaDAModel.from_pretrained(base_folder, dtype=torch.float32)

    # Only adapters changed: every other tensor still equals the bf16 folder; every B moved off its zero init.
    base_state = base.state_dict()
    names = dict(trained.named_parameters())
    adapters = [n for n in names if ".lora_" in n]
    assert len(adapters) == 2 * len(TARGETS) * 2  # A and B, per target, per block
    for name, param in names.items():
        if ".lora_" in name:
            assert param.requires_grad and param.dtype == torch.float32
        else:
            assert not param.requires_grad
            assert torch.equal(param, base_state[name.replace(".base_layer", "")]), name
    assert all(names[n].abs().sum() > 0 for n in adapters if ".lora_B." in n)
    # The head is not adapted (the fused loss reads its weight directly).
    assert type(trained.model.transformer.ff_out) is torch.nn.Linear

    # Checkpoints hold the adapters only, and their optimizer state covers only them.
    ckpt = torch.load(cfg.checkpoint_folder / "ep0-ba6-rank0.pt", weights_only=False, map_location="cpu")
    assert sorted(ckpt["state"]["model"]) == sorted(f"model.{n}" for n in adapters)
    opt_state = next(iter(ckpt["state"]["optimizers"].values()))["state"]
    assert len(opt_state) == len(adapters)

    ids = torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = trained(ids)
        # Merged weights (W + alpha/r B A) give the adapter model's logits.
        merged = LLaDAModel(base.config)
        merged.load_state_dict(
            merge_adapters(
                {k.removeprefix("model."): v for k, v in trainer.state.model.state_dict().items()},
                cfg.model.lora,
            )  # fmt: skip
        )
        torch.testing.assert_close(merged(ids), reference, rtol=0, atol=1e-5)
        final = check_exports(trainer, cfg.run_folder, base_folder, tmp_path, ids, reference)
    trainer.close()
    # scripts/generate.py samples from the adapter folder as from any export (a 6-batch model may well answer
    # with special tokens only: exit 3, not an error).
    args = [str(final), "--prompt", "The", "--gen-length", "4", "--steps", "2", "--no-chat"]
    assert generate_cli.main(args) in (0, generate_cli.EXIT_EMPTY)
    assert "error" not in capsys.readouterr().err


def test_kill_and_resume_equals_uninterrupted(base_folder, tmp_path):
    """Pretrain mode: a run killed (SIGKILL) while writing its 2nd checkpoint, then started again, ends with the
    same adapters as a run that was never interrupted; the base weights come from the folder at each start."""
    _, whole, losses = fit(base_folder, tmp_path / "whole")
    expected = adapter_weights(whole.state.model)
    whole.close()

    over = lora_overrides(base_folder, tmp_path / "killed")
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "faults.py"), "save", "2", str(QUICKSTART), *over],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    cfg, resumed, more = fit(base_folder, tmp_path / "killed")
    assert len(more) == 4  # resumed after batch 2 (the truncated batch-4 checkpoint was set aside)
    assert more == losses[2:]
    got = adapter_weights(resumed.state.model)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    resumed.close()


def test_bad_target_names_are_rejected_with_the_valid_list(base_folder, tmp_path, capsys):
    over = lora_overrides(base_folder, tmp_path, **{"model.lora.target_modules": "[q_proj,o_proj,gate_proj]"})
    assert train.main([str(QUICKSTART), *over]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("composer-dlm: error: model.lora: target_modules: 'o_proj', 'gate_proj' not LLaDA")
    assert "choose from q_proj, k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out" in err
    assert not (tmp_path / "lora").exists()


def test_lora_needs_a_pretrained_base(tmp_path, capsys):
    over = [f"base_path={tmp_path}", "model.lora.r=4"]
    assert train.main([str(QUICKSTART), *over]) == 2
    assert "model.lora adapts a pretrained model: set model.pretrained" in capsys.readouterr().err


def tiny_lora_model(base_dtype: torch.dtype) -> LLaDAModel:
    """A 2-block LLaDA with r=4 adapters on every block projection."""
    from composer_dlm.models.lora import LoRAConfig, apply_lora

    fields = {"d_model": 32, "n_layers": 2, "n_heads": 2, "mlp_hidden_size": 64, "vocab_size": 128}
    model = LLaDAModel.from_config(fields | {"mask_token_id": 127}, seed=0)
    apply_lora(model, LoRAConfig(r=4, alpha=8), base_dtype=base_dtype)
    return model


@pytest.fixture
def two_processes(monkeypatch):
    """``parallelize`` as on rank 0 of two (LoRA under FSDP is refused where nothing is sharded)."""
    from composer_dlm import parallel

    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 2)


@contextlib.contextmanager
def fsdp1_on_one_process(model: AnyModel, tmp_path: Path, **options: Any) -> Iterator[torch.nn.Module]:
    """torch's FSDP1 over ``model`` with the units ``parallelize`` chose (``fsdp_wrap_fn``), in a one-process
    gloo group on the CPU (so run as NO_SHARD), use_orig_params as Composer sets it."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield FSDP(
            model,
            auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=model.fsdp_wrap_fn),
            use_orig_params=True,
            device_id=torch.device("cpu"),
            **options,
        )
    finally:
        dist.destroy_process_group()


def test_fsdp_units_hold_one_dtype_each(tmp_path, two_processes):
    """``parallelize``'s FSDP wrap choice for a LoRA model: FSDP1 flattens each unit into one tensor of one dtype,
    so the fp32 adapters must be units apart from the bf16 blocks. Checked with torch's FSDP1 itself (one CPU
    process, gloo) under bf16 autocast, as Composer runs ``amp_bf16``: it wraps, and only the adapters get grads."""
    from torch.distributed.fsdp import MixedPrecision

    from composer_dlm.config import FSDPConfig
    from composer_dlm.diffusion import DiffusionConfig
    from composer_dlm.models.composer_llada import ComposerLLaDA
    from composer_dlm.parallel import parallelize

    model = tiny_lora_model(torch.bfloat16)
    parallelize(ComposerLLaDA(model, DiffusionConfig()), FSDPConfig(), on_gpu=True)
    mixed = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    with fsdp1_on_one_process(model, tmp_path, mixed_precision=mixed) as wrapped:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wrapped(torch.randint(0, 128, (2, 8))).float().square().mean()
        loss.backward()
        grads = {n: p.grad is not None for n, p in wrapped.named_parameters()}
    assert grads and all(has == (".lora_" in n) for n, has in grads.items()), grads


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_two_processes_through_the_launcher(base_folder, tmp_path):
    """``composer -n 2`` on CPU (gloo, DDP): both ranks train the same adapters; the checkpoint holds only them and
    the adapter export equals the checkpoint's adapters."""
    from faults import run_ranks

    over = lora_overrides(base_folder, tmp_path, max_duration="2ba", **{"checkpoint.save_interval": "2ba"})
    run_ranks(
        2,
        [str(ROOT / "composer_dlm" / "train.py"), str(QUICKSTART), *over],
        {"TRITON_INTERPRET": "0"},
        timeout=300,
    )
    check_adapter_checkpoint(tmp_path / "lora", "ep0-ba2-rank0.pt")


def check_adapter_checkpoint(run: Path, checkpoint: str) -> dict[str, torch.Tensor]:
    """A LoRA run's ``checkpoint`` holds only adapters, and its adapter export holds the same tensors; returns them."""
    from safetensors.torch import load_file

    model_state = torch.load(run / "checkpoints" / checkpoint, map_location="cpu", weights_only=False)[
        "state"
    ]["model"]
    assert model_state and all(".lora_" in k for k in model_state)
    exported = load_file(run / "hf" / "final" / "adapter_model.safetensors")
    assert len(exported) == len(model_state)
    for key, tensor in model_state.items():
        name = "base_model.model." + key.removeprefix("model.").replace(".default.", ".")
        assert torch.equal(exported[name], tensor), name
    return model_state


def test_half_precision_base_saves_no_second_copy_of_adapter_inputs():
    """Under bf16 autocast, peft's default cast of the adapters' inputs to fp32 makes autograd keep extra bf16
    copies of them for the backward; apply_lora turns that cast off for a half-precision base (autocast casts
    anyway). Same output, fewer bytes saved for the backward."""
    from composer_dlm.models.lora import LoRAConfig, apply_lora

    def saved_bytes_and_output(peft_cast: bool) -> tuple[int, torch.Tensor]:
        model = LLaDAModel.from_config(
            {"d_model": 256, "n_layers": 2, "n_heads": 4, "mlp_hidden_size": 768, "vocab_size": 512,
             "mask_token_id": 511},
            seed=0,
        )  # fmt: skip
        apply_lora(model, LoRAConfig(r=8, alpha=8), base_dtype=torch.bfloat16)
        with torch.no_grad():  # nonzero B, so the adapters contribute
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        if peft_cast:
            for module in model.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = True
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 500, (2, 512), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model.hidden_states(ids)
        return sum(storages.values()), out

    ours, out = saved_bytes_and_output(peft_cast=False)
    peft_default, reference = saved_bytes_and_output(peft_cast=True)
    assert torch.equal(out, reference)
    assert ours < peft_default  # measured here: 26.8 vs 31.0 MB, 4 x d_model bf16 values per token per block


@pytest.mark.parametrize("impl", ["chosen", "reentrant"])
def test_activation_checkpointing_keeps_the_adapter_gradients(impl, two_processes):
    """The frozen embedding's output needs no grad, so a reentrant checkpoint (Composer's default) returns block
    outputs without a graph and nothing trains; ``parallelize`` asks Composer for non-reentrant ones in LoRA runs.
    Checked with torch's checkpoint wrapper, which Composer applies."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    from composer_dlm.config import FSDPConfig
    from composer_dlm.diffusion import DiffusionConfig
    from composer_dlm.models.composer_llada import ComposerLLaDA
    from composer_dlm.parallel import parallelize

    model = tiny_lora_model(torch.float32)
    config = parallelize(
        ComposerLLaDA(model, DiffusionConfig()), FSDPConfig(activation_checkpointing=True), on_gpu=True
    )
    assert config is not None
    assert config["fsdp"]["activation_checkpointing_reentrant"] is False  # what parallelize asks of Composer
    wrapper = functools.partial(
        checkpoint_wrapper,
        checkpoint_impl=CheckpointImpl.REENTRANT if impl == "reentrant" else CheckpointImpl.NO_REENTRANT,
    )
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=wrapper, check_fn=model.activation_checkpointing_fn
    )
    loss = model(torch.randint(0, 128, (2, 8))).square().mean()
    if impl == "reentrant":
        assert loss.grad_fn is None
        return
    loss.backward()
    adapters = [p for n, p in model.named_parameters() if p.requires_grad]
    assert adapters and all(p.grad is not None for p in adapters)
    assert any(p.grad.abs().sum() > 0 for p in adapters)


def test_unsharded_fsdp_loses_frozen_parameters_so_lora_refuses_it(tmp_path, monkeypatch):
    """Why LoRA under FSDP needs real sharding, shown with torch's FSDP1 itself (one CPU process, where every
    strategy runs as NO_SHARD): after one backward the frozen units' parameters are no longer parameters and a
    state dict misses them. ``parallelize`` refuses that setting before any step, naming the fix."""

    from composer_dlm import parallel
    from composer_dlm.config import ConfigError, FSDPConfig
    from composer_dlm.diffusion import DiffusionConfig
    from composer_dlm.models.composer_llada import ComposerLLaDA

    model = tiny_lora_model(torch.float32)
    composer_model = ComposerLLaDA(model, DiffusionConfig())
    for world, fsdp in [
        (1, FSDPConfig()),
        (2, FSDPConfig(sharding_strategy="NO_SHARD")),
        (2, FSDPConfig(sharding_strategy="HYBRID_SHARD", data_parallel_replicate_degree=2)),
    ]:
        monkeypatch.setattr(parallel.dist, "get_world_size", lambda w=world: w)
        with pytest.raises(ConfigError, match="fsdp with model.lora must shard the model over 2 or more"):
            parallel.parallelize(composer_model, fsdp, on_gpu=True)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 2)
    assert parallel.parallelize(composer_model, FSDPConfig(), on_gpu=True) is not None

    with fsdp1_on_one_process(model, tmp_path) as wrapped:
        norm = model.model.transformer.blocks[0].attn_norm
        assert isinstance(norm.weight, torch.nn.Parameter)
        wrapped(torch.randint(0, 128, (2, 8))).square().mean().backward()
        assert not isinstance(norm.weight, torch.nn.Parameter)  # torch's behaviour behind the refusal
