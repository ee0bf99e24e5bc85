"""Our sampler against the peers' own code: the tokens that LLaDA's ``generate.py`` and Fast-dLLM's samplers
returned on a tiny random model, in float32 and bfloat16 on the CPU (``tests/fixtures/peer_sampler/``: their
outputs and how they were made; the peers' code is not in this repository)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from composer_dlm.generate import FastMode, generate
from composer_dlm.models import LLaDAModel

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "peer_sampler" / "outputs.json").read_text())
MASK = FIXTURE["model"]["mask_token_id"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _model(dtype_name: str) -> LLaDAModel:
    return LLaDAModel.from_config(FIXTURE["model"], seed=FIXTURE["seed"]).to(DTYPES[dtype_name]).eval()


def _prompts(rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(FIXTURE["prompt_seed"])
    return torch.randint(0, FIXTURE["prompt_high"], (rows, FIXTURE["prompt_length"]), generator=g)


@pytest.mark.parametrize("case", sorted(FIXTURE["llada"]))
def test_exact_mode_returns_llada_tokens(case: str) -> None:
    """Exact mode = LLaDA's current generate.py (bf16 confidence softmax, its topk), token for token."""
    spec: dict[str, Any] = FIXTURE["llada"][case]
    prompt = _prompts(spec["rows"])
    out = generate(
        _model(case.split("/")[1]), prompt, steps=spec["steps"], gen_length=spec["gen_length"],
        block_length=spec["block_length"], mask_token_id=MASK, cfg_scale=spec["cfg_scale"],
    )  # fmt: skip
    assert out.tolist() == spec["tokens"]


_FAST = {"generate": None, "generate_with_prefix_cache": "prefix", "generate_with_dual_cache": "dual"}


@pytest.mark.parametrize("case", sorted(c for c in FIXTURE["fast_dllm"] if c.endswith("float32")))
def test_fast_mode_returns_fast_dllm_tokens(case: str) -> None:
    """Fast mode = Fast-dLLM's samplers (its cache modes, threshold decoding) in float32. In bfloat16 its
    confidence is a float64 softmax (LLaDA's older semantics), ours LLaDA's current one in the logits' dtype, so
    ties can be broken differently there."""
    spec: dict[str, Any] = FIXTURE["fast_dllm"][case]
    out = generate(
        _model("float32"), _prompts(1), steps=spec["steps"], gen_length=spec["gen_length"],
        block_length=spec["block_length"], mask_token_id=MASK,
        fast=FastMode(cache=_FAST[spec["function"]], threshold=spec["threshold"]),
    )  # fmt: skip
    assert out.tolist() == spec["tokens"]


@pytest.mark.parametrize("case", sorted(c for c in FIXTURE["fast_dllm_factor"] if c.endswith("float32")))
def test_factor_rule_returns_fast_dllm_tokens(case: str) -> None:
    """Fast mode's factor rule = Fast-dLLM's factor-based parallel decoding (a later version of its generate.py,
    see the fixture's README) in float32: the same tokens in the same number of forwards."""
    spec: dict[str, Any] = FIXTURE["fast_dllm_factor"][case]
    steps: list[int] = []
    out = generate(
        _model("float32"), _prompts(1), steps=spec["steps"], gen_length=spec["gen_length"],
        block_length=spec["block_length"], mask_token_id=MASK,
        fast=FastMode(cache=_FAST[spec["function"]], factor=spec["factor"]), on_step=lambda i, x: steps.append(i),
    )  # fmt: skip
    assert out.tolist() == spec["tokens"]
    assert len(steps) == spec["nfe"]
