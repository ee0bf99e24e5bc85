"""Fast mode: the KV-cached forward against the full forward, the cached sampler with a fresh cache at every step
against exact mode and with Fast-dLLM's once-per-block cache against a naive reference (keys and values frozen by
hooks on the plain forward), and batches with prompts of different lengths against their rows run alone, in every
mode.
(Fast-dLLM's own outputs: tests/test_peer_sampler.py.)"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from composer_dlm.generate import FastMode, Selection, generate, left_pad
from composer_dlm.models import LLaDAModel

MASK = 127
CONFIG = dict(
    d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, mlp_hidden_size=128, mask_token_id=MASK,
    eos_token_id=126, init_std=0.15,
)  # fmt: skip
MODES: dict[str, dict[str, Any]] = {
    "exact": {},
    "prefix": dict(fast=FastMode(cache="prefix")),
    "dual": dict(fast=FastMode(cache="dual")),
    "threshold": dict(fast=FastMode(threshold=0.2)),
    "dual_threshold": dict(fast=FastMode(cache="dual", threshold=0.2)),
    "prefix_factor": dict(fast=FastMode(cache="prefix", factor=1.0)),
}


def _model(dtype: torch.dtype) -> LLaDAModel:
    return LLaDAModel.from_config(CONFIG, seed=0).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_forward_equals_full_forward(dtype):
    model = _model(dtype)
    ids = torch.randint(0, 120, (3, 20), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, :5] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=attn)
        cache = model.new_cache(ids, attn)
        assert torch.equal(model.forward_cached(ids, cache, 0), full)
        # Recomputing positions 8..12 (dual) or 8..20 (prefix) from that cache: the same rows, bit for bit.
        assert torch.equal(model.forward_cached(ids[:, 8:12], cache, 8), full[:, 8:12])
        assert torch.equal(model.forward_cached(ids[:, 8:], cache, 8), full[:, 8:])
        # New tokens in the recomputed slice: with one layer, the other keys and values depend on their own tokens
        # only, so the cache is still exact and the slice must see its new keys.
        one_layer = LLaDAModel.from_config({**CONFIG, "n_layers": 1}, seed=0).to(dtype).eval()
        cache = one_layer.new_cache(ids, attn)
        one_layer.forward_cached(ids, cache, 0)
        changed = ids.clone()
        changed[:, 9:] = 3
        fresh = one_layer(changed, attention_mask=attn)[:, 8:]
        assert torch.equal(one_layer.forward_cached(changed[:, 8:], cache, 8), fresh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_cache_refreshed_every_step_equals_exact_mode(dtype, cache, cfg_scale):
    model = _model(dtype)
    ids, attn = left_pad([[5, 6, 7], [8, 9, 10, 11, 12, 13]], pad_id=0)
    kw: dict[str, Any] = dict(
        steps=16, gen_length=16, block_length=4, mask_token_id=MASK, cfg_scale=cfg_scale
    )
    exact = generate(model, ids, attention_mask=attn, **kw)
    cached = generate(model, ids, attention_mask=attn, fast=FastMode(cache=cache, refresh_every=1), **kw)
    assert torch.equal(cached, exact)
    # Refreshed once per block, the later steps read stale keys and values: a different sampler.
    assert (generate(model, ids, attention_mask=attn, fast=FastMode(cache=cache), **kw) != MASK).all()


class _FrozenKeysValues:
    """A naive block-level KV cache on the plain forward: hooks on every layer's k/v projections record their
    outputs at the block's first step and, at its later steps, put the recorded rows back at the columns that are
    not recomputed. A full forward with those columns' keys and values frozen computes at the other columns what a
    cached forward over them computes (RoPE is applied after the projections, at each column's own position)."""

    def __init__(self, model: LLaDAModel) -> None:
        layers = [m for b in model.blocks for m in (b.k_proj, b.v_proj)]
        self.handles = [m.register_forward_hook(self._hook) for m in layers]
        self.recorded: dict[int, torch.Tensor] = {}
        self.frozen: torch.Tensor | None = None  # (L,) bool: the columns that keep their recorded rows

    def _hook(self, module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if self.frozen is None:
            self.recorded[id(module)] = out.clone()
            return out
        return torch.where(self.frozen[None, :, None], self.recorded[id(module)], out)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _naive_cached_sampler(
    model: LLaDAModel, ids: torch.Tensor, attn: torch.Tensor, *, steps: int, gen_length: int, block_length: int,
    cache: str, cfg_scale: float,
) -> torch.Tensor:  # fmt: skip
    """Fast-dLLM's prefix/dual cache, written plainly: per block, a full forward (recording keys and values) whose
    candidates are the masked columns up to the block's end, then full forwards with the prefix's (and, for
    ``dual``, the suffix's) keys and values frozen, whose candidates are the block's masked columns; each step
    commits its share of the block's masks by confidence, at temperature 0."""
    batch, prompt_length = ids.shape
    x = torch.cat([ids, torch.full((batch, gen_length), MASK)], dim=1)
    length = x.shape[1]
    mask = torch.cat([attn, torch.ones(batch, gen_length, dtype=attn.dtype)], dim=1)
    per_block = steps // (gen_length // block_length)
    counts = [block_length // per_block + (i < block_length % per_block) for i in range(per_block)]
    kv = _FrozenKeysValues(model)
    cols = torch.arange(length)
    try:
        for start in range(prompt_length, length, block_length):
            end = start + block_length
            recomputed = (cols >= start) & ((cols < end) if cache == "dual" else True)
            for step, k in enumerate(counts):
                kv.frozen = None if step == 0 else ~recomputed
                uncond = x.clone()
                uncond[:, :prompt_length] = MASK
                both = model(torch.cat([x, uncond]), attention_mask=torch.cat([mask, mask]))
                cond_logits, uncond_logits = both.chunk(2)
                logits = (
                    cond_logits
                    if cfg_scale == 0
                    else uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)
                )
                conf, x0 = logits.softmax(-1).max(-1)
                candidate = (x == MASK) & (cols < end) & ((cols >= start) if step > 0 else True)
                conf = torch.where(candidate, conf, float("-inf"))
                for row in range(batch):
                    top = conf[row].topk(k).indices
                    x[row, top] = x0[row, top]
    finally:
        kv.remove()
    return x


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_cached_modes_equal_naive_reference(cache, cfg_scale):
    """Prefix and dual cache against :func:`_naive_cached_sampler` in float32, on a batch of left-padded prompts:
    which columns are recomputed, what they attend to (the stale keys and values, padding masked), at which RoPE
    positions, and what is refilled at each block's start. (Fast-dLLM's own tokens, batch 1 without guidance:
    tests/test_peer_sampler.py.)"""
    model = _model(torch.float32)
    ids, attn = left_pad([[5, 6, 7], [8, 9, 10, 11, 12, 13], [40, 41, 42, 43, 44]], pad_id=0)
    kw: dict[str, Any] = dict(steps=8, gen_length=16, block_length=4, cfg_scale=cfg_scale)
    ours = generate(model, ids, attention_mask=attn, mask_token_id=MASK, fast=FastMode(cache=cache), **kw)
    assert ours.tolist() == _naive_cached_sampler(model, ids, attn, cache=cache, **kw).tolist()
    # The stale keys and values matter on this model: exact mode returns other tokens.
    assert not torch.equal(ours, generate(model, ids, attention_mask=attn, mask_token_id=MASK, **kw))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_batch_rows_equal_rows_alone(mode):
    # float64 keeps rounding at shifted absolute RoPE positions away from argmax and confidence ties.
    model = _model(torch.float64)
    rows = [[5, 6, 7], [8, 9, 10, 11, 12], [1, 2], [30, 31, 32, 33, 34, 35, 36]]
    ids, attn = left_pad(rows, pad_id=0)
    kw: dict[str, Any] = dict(steps=16, gen_length=16, block_length=8, mask_token_id=MASK, **MODES[mode])
    batched = generate(model, ids, attention_mask=attn, **kw)
    for row, prompt in enumerate(rows):
        alone = generate(model, torch.tensor([prompt]), **kw)
        assert batched[row, -16:].tolist() == alone[0, -16:].tolist(), row
    assert (batched[:, -16:] != MASK).all()


def test_parallel_rules_by_hand():
    inf = float("-inf")
    conf = torch.tensor([[0.1, 0.95, 0.5, inf, 0.9], [inf, inf, inf, inf, inf], [0.3, 0.2, inf, 0.1, inf]])
    assert Selection(threshold=0.8).mask(conf).tolist() == [
        [False, True, False, False, True],
        [False] * 5,  # nothing left to commit in this row
        [True, False, False, False, False],  # none reaches the threshold: the most confident alone
    ]
    # factor f = 1: the i-th most confident must reach 1 - 1 / (i + 1): 0.5, 0.667, 0.75, ...
    # row 0 sorted: 0.95 (first, always), 0.9 >= 0.667, 0.5 < 0.75 -> two; row 2: 0.3 first, 0.2 < 0.667 -> one.
    assert Selection(factor=1.0).mask(conf).tolist() == [
        [False, True, False, False, True],
        [False] * 5,
        [True, False, False, False, False],
    ]
    # Fast-dLLM's factor rule commits the least confident candidate too when it alone fails: 0.9 >= 0.5 (first),
    # 0.8 >= 0.667, 0.1 < 0.75 is the last of three -> all three; of two, 0.1 < 0.667 -> both.
    last = torch.tensor([[0.9, inf, 0.8, 0.1], [inf, 0.1, 0.3, inf]])
    assert Selection(factor=1.0).mask(last).tolist() == [
        [True, False, True, True],
        [False, True, True, False],
    ]


def test_threshold_commits_several_tokens_per_step():
    model = _model(torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    steps: list[int] = []
    kw: dict[str, Any] = dict(steps=16, gen_length=16, block_length=8, mask_token_id=MASK)
    out = generate(model, ids, fast=FastMode(threshold=0.05), on_step=lambda i, x: steps.append(i), **kw)
    assert (out != MASK).all() and len(steps) < 16


def test_fast_mode_arguments():
    with pytest.raises(ValueError, match="threshold or factor, not both"):
        FastMode(threshold=0.5, factor=1.0)
    with pytest.raises(ValueError, match="cache must be None"):
        FastMode(cache="full")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold must lie in"):
        FastMode(threshold=1.5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need Triton's interpreter")
@pytest.mark.parametrize("mode", ["dual_threshold", "prefix_factor"])
def test_fused_fast_mode_equals_plain_in_the_interpreter(mode):
    """The fused forward in every fast mode (cached steps and refreshes), without CUDA graphs, in float32: the
    same tokens as the plain forward (the kernels' transcendentals are not libdevice's here, so equal up to
    rounding, which the tokens do not see on this model)."""
    model = _model(torch.float32)
    ids, attn = left_pad([[5, 6, 7], [8, 9, 10, 11, 12, 13]], pad_id=0)
    kw: dict[str, Any] = dict(
        steps=8, gen_length=8, block_length=4, mask_token_id=MASK, attention_mask=attn, **MODES[mode]
    )
    plain = generate(model, ids, fused=False, **kw)
    assert torch.equal(generate(model, ids, fused=True, **kw), plain)
    assert (plain[:, -8:] != MASK).all()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["prefix", "dual", "dual_threshold", "prefix_factor"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_cuda_graph_cached_steps_equal_eager(mode, cfg_scale):
    """The cached steps replayed from CUDA graphs (one per block) against the same steps run eagerly, in bf16,
    with the fused forward and with the plain one: the same kernels, so bit for bit the same tokens (ties
    included, which bf16 makes frequent on a random model)."""
    model = _model(torch.bfloat16).cuda()
    ids, attn = left_pad([[5, 6, 7], [8, 9, 10, 11, 12, 13], [1, 2]], pad_id=0)
    ids, attn = ids.cuda(), attn.cuda()
    kw: dict[str, Any] = dict(
        steps=16, gen_length=32, block_length=8, mask_token_id=MASK, attention_mask=attn, cfg_scale=cfg_scale,
        **MODES[mode],
    )  # fmt: skip
    eager = generate(model, ids, cuda_graph=False, **kw)
    assert torch.equal(generate(model, ids, **kw), eager)  # defaults on CUDA: fused, graphs
    plain = generate(model, ids, cuda_graph=False, fused=False, **kw)
    assert torch.equal(plain, eager)  # the fused kernels: bitwise the eager ops
    assert torch.equal(generate(model, ids, cuda_graph=True, fused=False, **kw), plain)
    assert (eager[:, -32:] != MASK).all()


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cuda_bf16_cached_modes(cache):
    model = _model(torch.bfloat16).cuda()
    ids, attn = left_pad([[5, 6, 7], [8, 9, 10, 11, 12, 13]], pad_id=0)
    ids, attn = ids.cuda(), attn.cuda()
    kw: dict[str, Any] = dict(
        steps=16, gen_length=16, block_length=4, mask_token_id=MASK, attention_mask=attn
    )
    eager = generate(model, ids, cuda_graph=False, fused=False, **kw)
    assert torch.equal(generate(model, ids, fast=FastMode(cache=cache, refresh_every=1), **kw), eager)
    fast = generate(model, ids, fast=FastMode(cache=cache, threshold=0.2), **kw)
    assert (fast[:, -16:] != MASK).all()
