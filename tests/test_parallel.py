"""The unwrap helper and the parallelize step (composer_dlm/parallel.py), the noise clock that relies on them,
the NaN guard's choice of gradients, and the samples callback's chat template; one process each.

Real wrappers where torch builds them on CPU (DDP over a one-process gloo group, torch.compile's module,
the activation-checkpoint wrapper); FSDP1 refuses CPU-only machines, so its wrapper is covered on GPUs by
tests/test_gpu_multigpu.py.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types

import pytest
import torch
import torch.distributed as torch_dist
from composer.core import Precision
from faults import ROOT, free_port
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.nn.parallel import DistributedDataParallel

from composer_dlm.builders import samples_chat_template
from composer_dlm.callbacks.nan_guard import NaNGuard
from composer_dlm.callbacks.noise_clock import NoiseClock
from composer_dlm.callbacks.samples import SampleText
from composer_dlm.config import ConfigError, FSDPConfig
from composer_dlm.data import load_tokenizer, mask_token_id
from composer_dlm.diffusion import DiffusionConfig
from composer_dlm.models import LLaDAModel
from composer_dlm.models.composer_llada import ComposerLLaDA
from composer_dlm.models.llada import LLaDABlock
from composer_dlm.parallel import composer_llada, llada_runner, parallelize, unwrap, unwrap_llada

_BASE = LLaDAModel.from_config(
    dict(d_model=16, n_layers=2, n_heads=2, vocab_size=32, mlp_hidden_size=32, mask_token_id=31), seed=0
)


def make() -> ComposerLLaDA:
    return ComposerLLaDA(copy.deepcopy(_BASE), DiffusionConfig(random_length_prob=0.0), loss_impl="plain")


@pytest.fixture
def gloo_group():
    """A one-process gloo group, so DDP can wrap a module on CPU."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch_dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    torch_dist.destroy_process_group()


def test_unwrap_sees_through_ddp_compile_and_checkpoint_wrappers(gloo_group):
    model = make()
    ddp = DistributedDataParallel(model)
    assert unwrap(ddp) is model and composer_llada(ddp) is model
    assert llada_runner(ddp) is model.model and unwrap_llada(ddp) is model.model
    nested = torch.compile(DistributedDataParallel(checkpoint_wrapper(model)))
    assert unwrap(nested) is model
    # Inside the trunk: each wrapper layer is peeled, an ordinary module is returned as it is.
    block = model.model.blocks[0]
    assert unwrap(checkpoint_wrapper(block)) is block and unwrap(block) is block


def test_composer_llada_refuses_another_model():
    with pytest.raises(TypeError, match="ComposerLLaDA, got Linear"):
        composer_llada(torch.nn.Linear(2, 2))


def test_noise_clock_sets_step_and_global_row_through_ddp(gloo_group):
    model = make()
    state = types.SimpleNamespace(
        model=DistributedDataParallel(model),
        timestamp=types.SimpleNamespace(batch=7),
        train_dataloader=types.SimpleNamespace(batch_size=4),
        batch={"input_ids": torch.zeros(3, 8, dtype=torch.long)},  # a short last batch keeps the numbering
    )
    NoiseClock().before_train_batch(state, None)  # type: ignore[arg-type]
    assert (model.noise_step, model.noise_row) == (7, 0)  # rank 0 of 1: rows 0..3
    state.model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError):  # a hook the run relies on is not skipped silently
        NoiseClock().before_train_batch(state, None)  # type: ignore[arg-type]


def test_parallelize_chooses_blocks_for_fsdp_and_checkpointing():
    model = make()
    fsdp = FSDPConfig(sharding_strategy="SHARD_GRAD_OP", activation_checkpointing=True)
    assert parallelize(model, None, on_gpu=True) is None
    assert parallelize(model, fsdp, on_gpu=False) is None  # Composer's FSDP needs CUDA: DDP on CPU
    assert not hasattr(model.model, "fsdp_wrap_fn")
    config = parallelize(model, fsdp, on_gpu=True)
    assert config == {"fsdp": dataclasses.asdict(fsdp)}
    assert config["fsdp"]["sharding_strategy"] == "SHARD_GRAD_OP"
    chosen = [m for m in model.model.modules() if model.model.fsdp_wrap_fn(m)]
    assert chosen == list(model.model.blocks) and all(isinstance(m, LLaDABlock) for m in chosen)
    assert [m for m in model.model.modules() if model.model.activation_checkpointing_fn(m)] == chosen


def _guard_state(loss: float, grad: float, precision: Precision):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.full_like(p, grad)
    state = types.SimpleNamespace(
        loss=torch.tensor(loss),
        model=model,
        optimizers=[optimizer],
        precision=precision,
        timestamp=types.SimpleNamespace(batch=3),
    )
    logger = types.SimpleNamespace(log_metrics=lambda metrics: None)
    return state, logger, model


@pytest.mark.parametrize(
    ("loss", "grad", "precision", "skipped"),
    [
        (1.0, 0.5, Precision.FP32, False),
        (1.0, float("nan"), Precision.FP32, True),
        (float("inf"), 0.5, Precision.AMP_BF16, True),
        # amp_fp16: an overflowing (unscaled) gradient is the GradScaler's skip, not a non-finite step
        (1.0, float("inf"), Precision.AMP_FP16, False),
        (float("nan"), 0.5, Precision.AMP_FP16, True),
    ],
)
def test_nan_guard_drops_the_optimizers_gradients(loss, grad, precision, skipped):
    state, logger, model = _guard_state(loss, grad, precision)
    guard = NaNGuard(max_consecutive=2)
    guard.after_train_batch(state, logger)  # type: ignore[arg-type]
    assert guard.consecutive == int(skipped)
    assert all((p.grad is None) == skipped for p in model.parameters())


def test_samples_chat_template_wraps_prompts_as_a_user_turn():
    tokenizer = load_tokenizer("embedded")
    assert tokenizer.chat_template
    common = dict(interval="1ba", gen_length=4, steps=4, mask_token_id=mask_token_id(tokenizer))
    plain = SampleText(tokenizer, ["Hello"], **common)  # type: ignore[arg-type]
    chat = SampleText(tokenizer, ["Hello"], chat_template=True, **common)  # type: ignore[arg-type]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False
    )
    assert plain.prompt_ids == [tokenizer("Hello", add_special_tokens=False)["input_ids"]]
    assert chat.prompt_ids == [tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    assert len(chat.prompt_ids[0]) > len(plain.prompt_ids[0])
    # auto: on in SFT runs with a template only; true without a template is a config error
    assert samples_chat_template("auto", "sft", tokenizer) is True
    assert samples_chat_template("auto", "pretrain", tokenizer) is False
    assert samples_chat_template(False, "sft", tokenizer) is False
    no_template = types.SimpleNamespace(chat_template=None)
    assert samples_chat_template("auto", "sft", no_template) is False  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no chat template"):
        samples_chat_template(True, "sft", no_template)  # type: ignore[arg-type]


def test_deterministic_key_turns_on_deterministic_mode(tmp_path, monkeypatch):
    """``deterministic: true`` -> deterministic torch algorithms and the fixed cuBLAS workspace, set before the
    model is built; off by default. Restored afterwards (the setting is process-wide)."""
    from test_train import tiny_overrides

    from composer_dlm.builders import build_trainer
    from composer_dlm.config import load_config

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    quickstart = ROOT / "yamls" / "quickstart.yaml"
    assert load_config(quickstart, tiny_overrides(tmp_path)).deterministic is False
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        build_trainer(load_config(quickstart, tiny_overrides(tmp_path, deterministic="true"))).close()
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
