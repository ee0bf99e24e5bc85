"""LLaDA's sampler: iterative unmasking with low-confidence (or random) remasking, semi-autoregressive
blocks and unsupervised classifier-free guidance.

The answer starts as ``gen_length`` mask tokens after the prompt and is split into ``gen_length /
block_length`` blocks decoded left to right, ``steps / num_blocks`` steps each. At every step the model
predicts all positions at once; among the still-masked positions up to the end of the current block, the
``k`` most confident predictions are committed and the others stay masked. ``k`` spreads the block's
``block_length`` masks evenly over its steps: ``base = block_length // steps_per_block`` and the first
``block_length % steps_per_block`` steps commit one more (:func:`commit_schedule`).

Per step, with ``l`` the logits at the candidate positions:

- guidance (``cfg_scale = s > 0``): ``l = l_uncond + (s + 1) * (l_cond - l_uncond)``, where the unconditional
  pass sees the whole prompt replaced by mask tokens;
- prediction: ``x0 = argmax l`` at temperature 0, otherwise Gumbel-max in float64,
  ``x0 = argmax exp(l) / (-log u) ** temperature`` with ``u ~ U(0, 1)``;
- confidence: ``softmax(l)[x0]`` in the logits' own dtype (``low_confidence``), or ``u ~ U(0, 1)``
  (``random``); positions that are not masked, and positions after the current block, never compete;
- commit: a ``topk`` over each row's whole-sequence confidence, so exact ties (frequent in bf16) are broken as
  LLaDA's ``topk`` breaks them on the same device.

These are the semantics of LLaDA's current ``generate.py`` (ML-GSAI/LLaDA; its commit "Remove float64 in softmax"
moved the confidence from float64 to the logits' dtype, and this sampler follows the current version). At
temperature 0 the output is token for token what it returns, in bf16 as in fp32 (tests/test_peer_sampler.py holds
its outputs); at temperature > 0 and for random remasking the distributions are the same but the random streams
are not (LLaDA draws noise for every position, this sampler for the candidates only). That includes its quirk when
the model predicts the mask token itself: committing it leaves the position masked, so it stays a candidate (also
in later blocks).

What differs is how the work is done, not the result: for a :class:`LLaDAModel` only the candidate rows go
through the output projection and the softmax (the reference does every position's full vocabulary), the commit
is a batched selection on the device with a static ``k`` (no host synchronisation per step, no Python loop over the
batch), on CUDA the model runs its fused forward (elementwise kernels that reproduce the eager ops bit for bit, see
:mod:`kernels.inference`), and at temperature 0 each step is replayed from a captured CUDA graph, which removes the
gaps between kernel launches. ``python scripts/benchmark.py sampler`` times it against LLaDA's own sampler and
modeling file on the same weights in the same run and checks the tokens are identical.

Fast mode (opt-in: ``cache``, ``threshold``, ``factor``) follows Fast-dLLM (NVlabs/Fast-dLLM): a block-level KV
cache refreshed at each block's first step, prefix or dual, and confidence-threshold (or factor) parallel
decoding; see :class:`_FastSampler`. Its confidence is LLaDA's current one (Fast-dLLM's is a float64 softmax, from
LLaDA's earlier version), so in bf16 its ties may be broken differently from Fast-dLLM's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Hashable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from composer_dlm.models.llada import FusedInference, KVCache, LLaDAModel

Remasking = Literal["low_confidence", "random"]
HeadRows = Literal["candidates", "all"]
CacheMode = Literal["prefix", "dual"]
StepCallback = Callable[[int, torch.Tensor], None]
"""``on_step(step, x)``: called after every step with its index (0-based over all blocks) and the current
tokens ``x`` (B, prompt + gen_length), masks still in place. ``x`` is the sampler's live buffer: copy it to keep it."""

_REMASKING = ("low_confidence", "random")


def commit_schedule(num_masked: int, steps: int) -> list[int]:
    """How many tokens each of ``steps`` steps commits so that ``num_masked`` masks are spread evenly:
    ``num_masked // steps`` each, plus one for the first ``num_masked % steps`` steps.

    >>> commit_schedule(10, 4)
    [3, 3, 2, 2]
    """
    if num_masked < 0 or steps <= 0:
        raise ValueError(f"need num_masked >= 0 and steps > 0, got {num_masked} and {steps}")
    base, extra = divmod(num_masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """The static shape of a generation: where each block lies and what each of its steps commits."""

    prompt_length: int
    gen_length: int
    block_length: int
    steps: int

    def __post_init__(self) -> None:
        for name in ("gen_length", "block_length", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length ({self.gen_length}) must be divisible by block_length ({self.block_length})"
            )
        if self.steps % self.num_blocks:
            raise ValueError(
                f"steps ({self.steps}) must be divisible by the number of blocks "
                f"gen_length / block_length = {self.num_blocks}"
            )

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def commits_per_step(self) -> list[int]:
        """Tokens committed at each step of a block; every block starts with ``block_length`` masks in every row."""
        return commit_schedule(self.block_length, self.steps_per_block)

    def block_bounds(self, block: int) -> tuple[int, int]:
        """Column range [start, end) of ``block`` in the full sequence."""
        start = self.prompt_length + block * self.block_length
        return start, start + self.block_length


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks token lists of different lengths, padded on the left, as :func:`generate` expects.

    Returns ``input_ids`` (B, max_len) long and ``attention_mask`` (B, max_len) long, 1 on real tokens.
    """
    if not sequences:
        raise ValueError("left_pad needs at least one sequence")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def guided_logits(
    model: nn.Module,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cols: torch.Tensor,
    *,
    prompt_length: int,
    mask_token_id: int,
    cfg_scale: float,
    head_rows: HeadRows = "candidates",
    fused: FusedInference | bool = False,
) -> torch.Tensor:
    """Logits (B, R, V) of ``model`` on ``x`` (B, L) at the columns ``cols`` (R,), with LLaDA's unsupervised
    classifier-free guidance when ``cfg_scale = s > 0``: ``l_uncond + (s + 1) * (l_cond - l_uncond)``, the
    unconditional pass seeing the first ``prompt_length`` columns replaced by ``mask_token_id`` (both passes run
    as one batch). The sampler's (the likelihood estimate guides its per-position losses with :func:`guide`).

    ``head_rows="candidates"`` sends only the rows at ``cols`` of a :class:`LLaDAModel` through the output
    projection; ``fused`` is passed to its forward. Other modules return full logits, which are then indexed.
    """
    if cfg_scale > 0:
        uncond = x.clone()
        uncond[:, :prompt_length] = mask_token_id
        x = torch.cat([x, uncond])
        attention_mask = torch.cat([attention_mask, attention_mask]) if attention_mask is not None else None
    logits_BRV = _column_logits(model, x, attention_mask, cols, head_rows, fused)
    if cfg_scale > 0:
        cond, uncond_logits = logits_BRV.chunk(2)
        logits_BRV = guide(cond, uncond_logits, cfg_scale)
    return logits_BRV


def guide(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """LLaDA's unsupervised classifier-free guidance: ``uncond + (cfg_scale + 1) * (cond - uncond)``."""
    return uncond + (cfg_scale + 1) * (cond - uncond)


def _column_logits(
    model: nn.Module,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cols: torch.Tensor,
    head_rows: HeadRows,
    fused: FusedInference | bool,
) -> torch.Tensor:
    if isinstance(model, LLaDAModel) and head_rows == "candidates":
        # Project only the candidate rows: the trunk is unchanged, and F.linear on a subset of rows computes
        # each of those rows as the full projection does.
        def head(hidden_BLH: torch.Tensor, weight_VH: torch.Tensor) -> torch.Tensor:
            return F.linear(hidden_BLH.index_select(1, cols), weight_VH)

        return model(x, attention_mask=attention_mask, head=head, fused=fused)
    return full_logits(model, x, attention_mask).index_select(1, cols)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """The sampling settings every step reads (see :func:`generate`)."""

    mask_token_id: int
    temperature: float
    cfg_scale: float
    remasking: Remasking
    eos_token_id: int | None
    min_new_tokens: int
    generator: torch.Generator | None


@dataclasses.dataclass
class _Denoiser:
    """One denoising step, written so that it can run eagerly or be captured into a CUDA graph: static
    shapes, ``k`` a Python int, the candidate columns a device tensor, no host synchronisation."""

    model: nn.Module
    x: torch.Tensor  # (B, L) long, updated in place
    attention_mask: torch.Tensor | None  # (B, L) as the caller gave it, extended with ones over the answer
    prompt_length: int
    rule: _Rule
    head_rows: HeadRows
    fused: FusedInference | bool

    def logits(self, cols: torch.Tensor) -> torch.Tensor:
        """Logits (B, R, V) at the columns ``cols`` (R,), guidance and EOS suppression applied."""
        logits_BRV = guided_logits(
            self.model, self.x, self.attention_mask, cols, prompt_length=self.prompt_length,
            mask_token_id=self.rule.mask_token_id, cfg_scale=self.rule.cfg_scale, head_rows=self.head_rows,
            fused=self.fused,
        )  # fmt: skip
        return forbid_early_eos(
            logits_BRV, cols, self.prompt_length, self.rule.eos_token_id, self.rule.min_new_tokens
        )

    def step(self, cols: torch.Tensor, k: int) -> None:
        """Predict at ``cols`` and commit the ``k`` most confident still-masked positions in each row."""
        x0_BR, conf_BR = self.predict(cols)
        commit(self.x, cols, x0_BR, conf_BR, (0, self.x.shape[1]), self.rule.mask_token_id, Selection(k=k))

    def predict(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The predicted tokens (B, R) at ``cols`` and their confidence (B, R), as LLaDA's current sampler computes
        them: ``softmax(l)[x0]`` in the logits' own dtype (LLaDA dropped the float64 softmax in its commit "Remove
        float64 in softmax"), or ``u ~ U(0, 1)`` in float32 for random remasking."""
        return predict_tokens(
            self.logits(cols), self.rule.temperature, self.rule.remasking, self.rule.generator
        )


def forbid_early_eos(
    logits_BRV: torch.Tensor,
    cols: torch.Tensor,
    prompt_length: int,
    eos_token_id: int | None,
    min_new_tokens: int,
) -> torch.Tensor:
    """Sets the EOS logit to -inf (in place) at the columns ``cols`` that lie among the first ``min_new_tokens``
    answer positions; returns ``logits_BRV``."""
    if min_new_tokens > 0:
        assert eos_token_id is not None
        early = (cols - prompt_length) < min_new_tokens  # (R,)
        logits_BRV[:, :, eos_token_id].masked_fill_(early, float("-inf"))
    return logits_BRV


@dataclasses.dataclass(frozen=True)
class FastMode:
    """Fast mode's settings (Fast-dLLM's methods); every combination is allowed, e.g. ``FastMode(cache="dual",
    threshold=0.9)``.

    Attributes:
        cache: block-level KV cache: at each block's first step one full forward fills the cache and commits;
            later steps of the block recompute only the block and everything after it (``"prefix"``: the prompt's
            and the finished blocks' keys and values are reused) or only the block (``"dual"``: the later, still
            masked blocks' are reused too). None: every step is a full forward. Needs a :class:`LLaDAModel`.
        threshold: parallel decoding: each step commits every candidate of the current block whose confidence is
            at least ``threshold`` (at least one per row) instead of ``steps / num_blocks`` per block; a block takes
            as many steps as it needs (at most ``block_length``).
        factor: the factor variant of parallel decoding (see :class:`Selection`); excludes ``threshold``.
        refresh_every: with ``cache``, also refill the cache (one full forward) every ``refresh_every`` steps inside
            a block; 0: once per block, as Fast-dLLM. 1 makes every step a full forward, which is exact mode.
    """

    cache: CacheMode | None = None
    threshold: float | None = None
    factor: float | None = None
    refresh_every: int = 0

    def __post_init__(self) -> None:
        if self.cache not in (None, "prefix", "dual"):
            raise ValueError(f"cache must be None, 'prefix' or 'dual', got {self.cache!r}")
        if self.threshold is not None and self.factor is not None:
            raise ValueError("pass threshold or factor, not both")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold!r}")
        if self.factor is not None and not self.factor > 0:
            raise ValueError(f"factor must be > 0, got {self.factor!r}")
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0, got {self.refresh_every}")

    @property
    def selection(self) -> Selection | None:
        """The parallel rule, or None for the exact schedule's count per step."""
        if self.threshold is None and self.factor is None:
            return None
        return Selection(threshold=self.threshold, factor=self.factor)


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which still-masked candidates a step commits: the ``k`` most confident; or (parallel decoding) every one
    whose confidence reaches ``threshold``; or, with ``factor`` f, the n most confident where n is the largest
    count whose sorted confidences c_1 >= c_2 >= ... satisfy ``c_i >= 1 - f / (i + 1)`` for every i <= n, except
    that n = N - 1 of a row's N candidates becomes N (Fast-dLLM's factor rule does so: it commits the least
    confident candidate too when that one alone fails; so a row with two candidates commits both). The parallel rules
    always commit the most confident candidate of a row that has any."""

    k: int | None = None
    threshold: float | None = None
    factor: float | None = None

    def mask(self, conf_BW: torch.Tensor) -> torch.Tensor:
        """(B, W) bool: the positions to commit, given confidences with -inf on non-candidates."""
        if self.k is not None:
            top_BK = conf_BW.topk(self.k, dim=-1).indices
            return torch.zeros_like(conf_BW, dtype=torch.bool).scatter_(1, top_BK, True)
        candidate = conf_BW > float("-inf")
        top_B1 = conf_BW.topk(1, dim=-1).indices
        chosen = torch.zeros_like(candidate).scatter_(1, top_B1, True)
        if self.threshold is not None:
            chosen |= conf_BW >= self.threshold
        else:
            assert self.factor is not None
            sorted_BW, order_BW = conf_BW.sort(dim=-1, descending=True)
            rank = torch.arange(1, conf_BW.shape[1] + 1, device=conf_BW.device, dtype=sorted_BW.dtype)
            passes = sorted_BW >= 1 - self.factor / (rank + 1)
            passes[:, 0] = True
            n_B1 = passes.long().cumprod(-1).sum(-1, keepdim=True)
            # Fast-dLLM's rule: when the first to fail is the least confident candidate, it is committed too.
            count_B1 = candidate.sum(-1, keepdim=True)
            n_B1 = torch.where(n_B1 == count_B1 - 1, count_B1, n_B1)
            ranks_BW = torch.empty_like(order_BW).scatter_(
                1,
                order_BW,
                torch.arange(conf_BW.shape[1], device=conf_BW.device).expand_as(order_BW).contiguous(),
            )
            chosen |= ranks_BW < n_B1
        return chosen & candidate


def commit(
    x: torch.Tensor,
    cols: torch.Tensor,
    x0_BR: torch.Tensor,
    conf_BR: torch.Tensor,
    window: tuple[int, int],
    mask_token_id: int,
    selection: Selection,
) -> None:
    """Writes into ``x`` (B, L) the predictions ``x0_BR`` at the candidate columns ``cols`` that ``selection`` picks
    by confidence ``conf_BR``, among the still-masked ones.

    The selection runs over the columns ``window = (lo, hi)``, -inf off the candidates, as LLaDA's and Fast-dLLM's
    ``topk`` runs over the row they pass it (the whole sequence; for Fast-dLLM's cached steps the part they
    recompute): exact ties are then broken as theirs are on the same device, by position on CUDA and on the CPU by
    the order its selection algorithm visits a row of that length. Committing the mask token itself leaves the
    position masked (LLaDA's behaviour)."""
    lo, hi = window
    current_BR = x.index_select(1, cols)
    still_masked = current_BR == mask_token_id
    local = cols - lo
    conf_BW = conf_BR.new_full((x.shape[0], hi - lo), float("-inf"))
    conf_BW[:, local] = torch.where(still_masked, conf_BR, float("-inf"))
    x0_BW = x[:, lo:hi].clone()
    x0_BW[:, local] = torch.where(still_masked, x0_BR, current_BR)
    x[:, lo:hi] = torch.where(selection.mask(conf_BW), x0_BW, x[:, lo:hi])


def predict_tokens(
    logits_BRV: torch.Tensor, temperature: float, remasking: Remasking, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x0`` (B, R) and its confidence (B, R) from logits (B, R, V), LLaDA's way.

    ``x0 = argmax l`` at temperature 0, otherwise Gumbel-max in float64, ``argmax exp(l) / (-log u) ** T`` with
    ``u ~ U(0, 1)``. The confidence of low-confidence remasking is ``softmax(l)[x0]`` taken in ``l``'s dtype (bf16
    for a bf16 model) from the logits without noise; random remasking draws it from ``U(0, 1)`` in float32.
    """
    if temperature > 0:
        noisy = logits_BRV.to(torch.float64)
        u = torch.rand(noisy.shape, dtype=torch.float64, device=noisy.device, generator=generator)
        x0_BR = (noisy.exp() / (-torch.log(u)) ** temperature).argmax(-1)
    else:
        x0_BR = logits_BRV.argmax(-1)
    if remasking == "low_confidence":
        conf_BR = F.softmax(logits_BRV, dim=-1).gather(-1, x0_BR.unsqueeze(-1)).squeeze(-1)
    else:
        conf_BR = torch.rand(x0_BR.shape, dtype=torch.float32, device=x0_BR.device, generator=generator)
    return x0_BR, conf_BR


def _check_inputs(
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    mask_token_id: int,
    temperature: float,
    cfg_scale: float,
    remasking: str,
    eos_token_id: int | None,
    min_new_tokens: int,
    gen_length: int,
    head_rows: str,
) -> None:
    if prompt_ids.dim() != 2 or prompt_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"prompt_ids must be an integer tensor (B, P) or (P,), got {prompt_ids.dtype} {tuple(prompt_ids.shape)}"
        )
    if prompt_ids.shape[0] == 0:
        raise ValueError("prompt_ids has no rows")
    if not isinstance(mask_token_id, int) or isinstance(mask_token_id, bool) or mask_token_id < 0:
        raise ValueError(f"mask_token_id must be a non-negative integer, got {mask_token_id!r}")
    if remasking not in _REMASKING:
        raise ValueError(f"remasking must be one of {_REMASKING}, got {remasking!r}")
    if head_rows not in ("candidates", "all"):
        raise ValueError(f"head_rows must be 'candidates' or 'all', got {head_rows!r}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (cfg_scale >= 0 and math.isfinite(cfg_scale)):
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")
    if not 0 <= min_new_tokens <= gen_length:
        raise ValueError(f"min_new_tokens must lie in [0, gen_length={gen_length}], got {min_new_tokens}")
    if min_new_tokens > 0 and eos_token_id is None:
        raise ValueError("min_new_tokens > 0 needs eos_token_id (the token to forbid)")
    if (prompt_ids == mask_token_id).any():
        raise ValueError(
            f"prompt_ids contain the mask token ({mask_token_id}); the sampler treats every mask as a position to "
            "generate. Pad with another id (the attention mask marks padding)."
        )
    if attention_mask is not None:
        if attention_mask.shape != prompt_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, prompt_ids {tuple(prompt_ids.shape)}"
            )
        real = attention_mask.to(torch.bool)
        if prompt_ids.shape[1] > 1 and (real[:, :-1] & ~real[:, 1:]).any():
            raise ValueError(
                "attention_mask must pad on the left (0s before 1s in every row): the answer is appended after "
                "the last column, so right padding would put pads between prompt and answer"
            )


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    mask_token_id: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: Remasking = "low_confidence",
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    min_new_tokens: int = 0,
    generator: torch.Generator | None = None,
    on_step: StepCallback | None = None,
    cuda_graph: bool | None = None,
    head_rows: HeadRows = "candidates",
    fused: bool | None = None,
    fast: FastMode | None = None,
) -> torch.Tensor:
    """Samples ``gen_length`` tokens after each prompt; returns the prompt followed by them, (B, P + gen_length).

    Args:
        model: a :class:`LLaDAModel`, or any module mapping ``(input_ids, attention_mask=...)`` to logits (B, L, V)
            (or to an object with ``.logits``). Put it in eval mode; its dtype and device are used as they are.
        prompt_ids: (B, P) or (P,) token ids; prompts of different lengths are left-padded (see :func:`left_pad`).
        steps: total denoising steps, divisible by ``gen_length / block_length``.
        gen_length: tokens to generate; divisible by ``block_length``.
        block_length: semi-autoregressive block size (``== gen_length`` for one block).
        mask_token_id: the model's mask token; it must not occur in ``prompt_ids``.
        temperature: 0 for greedy (deterministic), otherwise Gumbel-max sampling in float64.
        cfg_scale: unsupervised classifier-free guidance scale ``s``; 0 disables it (one forward per step).
        remasking: ``"low_confidence"`` (commit the most probable predictions) or ``"random"``.
        attention_mask: (B, P), 1 on real tokens and 0 on left padding; the answer columns are always attended.
        eos_token_id, min_new_tokens: EOS is forbidden (its logit set to -inf) at the first ``min_new_tokens``
            answer positions. ``min_new_tokens=gen_length`` forbids it everywhere (LLaDA's ``logits_eos_inf``);
            ``gen_length - block_length`` allows it only in the last block.
        generator: random source for ``temperature > 0`` or ``remasking="random"``, on the model's device.
        on_step: ``on_step(step, x)`` after every step, e.g. to display the denoising (see :data:`StepCallback`).
        cuda_graph: replay each step from a captured CUDA graph. Default: on for a plain :class:`LLaDAModel`
            on CUDA (not FSDP-sharded, no autocast active) at ``temperature == 0`` with ``remasking ==
            "low_confidence"`` (the deterministic case).
        head_rows: ``"candidates"`` projects only the positions that can be committed; ``"all"`` projects every
            position as the reference does (slower; for checking).
        fused: run the model's elementwise work in fused kernels, and q/k/v as one product where that gives the
            same bits and memory allows (:meth:`LLaDAModel.fused_inference`; 3.2 GB more for LLaDA-8B); the logits
            are bitwise the eager forward's (:mod:`kernels.inference`). Default: on for a plain
            :class:`LLaDAModel` on CUDA (as for ``cuda_graph``); ``False`` for checking.

        fast: opt-in fast mode (:class:`FastMode`): Fast-dLLM's block-level KV cache and/or parallel decoding.
            None (the default) is exact mode. ``fused`` applies to every forward of fast mode; ``cuda_graph`` to
            the cached steps (see :class:`_FastSampler`), the full forwards running eagerly.

    Steps that commit nothing (more steps per block than block_length) are skipped: they would change nothing.
    """
    if fast is not None and fast.cache is not None and not isinstance(model, LLaDAModel):
        raise ValueError(
            f"fast mode's cache needs a LLaDAModel (its forward_cached), not {type(model).__name__}; LLaDA-MoE has "
            "no KV-cached forward yet: leave the cache unset (threshold/factor decoding works without it)"
        )
    squeeze = prompt_ids.dim() == 1
    if squeeze:
        prompt_ids = prompt_ids.unsqueeze(0)
        attention_mask = attention_mask.unsqueeze(0) if attention_mask is not None else None
    plan = BlockPlan(prompt_ids.shape[1], gen_length, block_length, steps)
    _check_inputs(
        prompt_ids,
        attention_mask,
        mask_token_id=mask_token_id,
        temperature=temperature,
        cfg_scale=cfg_scale,
        remasking=remasking,
        eos_token_id=eos_token_id,
        min_new_tokens=min_new_tokens,
        gen_length=gen_length,
        head_rows=head_rows,
    )
    device = model_device(model, prompt_ids.device)
    deterministic = temperature == 0 and remasking == "low_confidence"
    if cuda_graph and (device.type != "cuda" or not deterministic):
        raise ValueError(
            "cuda_graph=True needs a model on CUDA, temperature=0 and remasking='low_confidence'; "
            "pass cuda_graph=None to choose automatically"
        )
    plain_cuda = fused_by_default(model, device)
    use_graph = (deterministic and plain_cuda) if cuda_graph is None else cuda_graph
    if fused and not (plain_cuda or (_graph_safe(model) and os.environ.get("TRITON_INTERPRET") == "1")):
        raise ValueError("fused=True needs a plain LLaDAModel on CUDA (not FSDP-sharded, no autocast)")
    use_fused = plain_cuda if fused is None else fused
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the model on {device}")

    batch, prompt_length = prompt_ids.shape
    x = torch.full((batch, prompt_length + gen_length), mask_token_id, dtype=torch.long, device=device)
    x[:, :prompt_length] = prompt_ids.to(device=device, dtype=torch.long)
    full_mask = None
    if attention_mask is not None:
        answer = torch.ones((batch, gen_length), dtype=attention_mask.dtype, device=device)
        full_mask = torch.cat([attention_mask.to(device), answer], dim=1)

    rule = _Rule(mask_token_id, temperature, cfg_scale, remasking, eos_token_id, min_new_tokens, generator)
    if fast is not None:
        cached_graphs = _Graphs(device) if use_graph and fast.cache is not None else None
        _FastSampler(model, x, full_mask, plan, rule, fast, use_fused, cached_graphs).run(on_step)
        return x[0] if squeeze else x
    fused_options: FusedInference | bool = False
    if use_fused:
        assert isinstance(model, LLaDAModel)
        fused_options = model.fused_inference(torch.cat([x, x]) if cfg_scale > 0 else x)
    denoiser = _Denoiser(model, x, full_mask, prompt_length, rule, head_rows, fused_options)
    graphs = _GraphSteps(denoiser, plan.block_length, device) if use_graph else None
    counts = plan.commits_per_step
    step_index = 0
    for block in range(plan.num_blocks):
        start, end = plan.block_bounds(block)
        # Candidates are the masked positions up to the block's end. Earlier blocks are fully decoded unless the
        # model committed the mask token itself (rare in trained models); one check per block (one host
        # synchronisation) finds that case, which then runs eagerly over the wider candidate range.
        leftover = block > 0 and bool((x[:, prompt_length:start] == mask_token_id).any())
        cols = torch.arange(prompt_length if leftover else start, end, device=device)
        if graphs is not None and not leftover:
            graphs.set_columns(cols)
        for k in counts:
            if k > 0:
                if graphs is not None and not leftover:
                    graphs.run(k)
                else:
                    denoiser.step(cols, k)
            if on_step is not None:
                on_step(step_index, x)
            step_index += 1
    return x[0] if squeeze else x


@dataclasses.dataclass
class _FastSampler:
    """Fast mode: Fast-dLLM's block-level KV cache and/or confidence-threshold (or factor) parallel decoding.

    Per block: step 0 (and every ``refresh_every``-th step) is a full forward over the whole sequence, whose
    candidates are the masked positions up to the block's end, as in exact mode; with ``cache`` it also refills the
    key/value cache (allocated once, refilled in place). Later steps recompute, from the cache, the block and the
    suffix (``"prefix"``) or the block alone (``"dual"``); their candidates are the block's masked positions.
    Without ``selection`` each step commits the exact schedule's count; with it, the parallel rule, and the block
    ends when no row has a mask left in it.

    ``fused``: the model's fused forward (:meth:`LLaDAModel.forward_cached`). ``graphs``: the cached steps (forward,
    prediction and commit, all on the device) are replayed from CUDA graphs, one per block and selection rule,
    captured at the block's first cached step; the refreshes run eagerly. The parallel rules are masks on the
    device, so a graph serves every step of a block whatever it commits; only the end-of-block check reads the host.
    """

    model: nn.Module
    x: torch.Tensor
    attention_mask: torch.Tensor | None
    plan: BlockPlan
    rule: _Rule
    fast: FastMode
    fused: bool = False
    graphs: _Graphs | None = None

    def run(self, on_step: StepCallback | None) -> None:
        plan, x, prompt_length = self.plan, self.x, self.plan.prompt_length
        cache, parallel = self.fast.cache, self.fast.selection
        counts = plan.commits_per_step
        max_steps = plan.block_length if parallel is not None else plan.steps_per_block
        step_index = 0
        kv: KVCache | None = None
        length = x.shape[1]
        for block in range(plan.num_blocks):
            start, end = plan.block_bounds(block)
            block_cols = torch.arange(start, end, device=x.device)  # read by this block's graph
            for step in range(max_steps):
                if parallel is None and counts[step] == 0:
                    step_index += 1
                    continue
                selection = parallel or Selection(k=counts[step])
                refresh = (
                    cache is None
                    or step == 0
                    or (self.fast.refresh_every and step % self.fast.refresh_every == 0)
                )
                if refresh:
                    cols = torch.arange(prompt_length, end, device=x.device)
                    if cache is None:
                        logits = guided_logits(
                            self.model, x, self.attention_mask, cols, prompt_length=prompt_length,
                            mask_token_id=self.rule.mask_token_id, cfg_scale=self.rule.cfg_scale,
                            fused=self.fused,
                        )  # fmt: skip
                        self._commit(logits, cols, (0, length), selection)
                    else:
                        if kv is None:
                            assert isinstance(self.model, LLaDAModel)
                            kv = self.model.new_cache(self._guided_input(x), self._guided_mask())
                        self._cached_step(kv, 0, length, cols, selection)
                else:
                    assert kv is not None
                    stop = end if cache == "dual" else length
                    run = functools.partial(self._cached_step, kv, start, stop, block_cols, selection)
                    if self.graphs is None:
                        run()
                    else:
                        self.graphs.run((start, stop, selection), run)
                if on_step is not None:
                    on_step(step_index, x)
                step_index += 1
                if parallel is not None and not bool((x[:, start:end] == self.rule.mask_token_id).any()):
                    break

    def _cached_step(
        self, kv: KVCache, start: int, stop: int, cols: torch.Tensor, selection: Selection
    ) -> None:
        """One step from the cache: recompute the columns ``[start, stop)``, commit among the candidates ``cols``
        (selecting over that window, as Fast-dLLM's ``topk`` runs over the part it recomputes)."""
        self._commit(self._cached_logits(kv, start, stop, cols), cols, (start, stop), selection)

    def _commit(
        self, logits_BRV: torch.Tensor, cols: torch.Tensor, window: tuple[int, int], selection: Selection
    ) -> None:
        logits_BRV = forbid_early_eos(
            logits_BRV, cols, self.plan.prompt_length, self.rule.eos_token_id, self.rule.min_new_tokens
        )
        x0_BR, conf_BR = predict_tokens(
            logits_BRV, self.rule.temperature, self.rule.remasking, self.rule.generator
        )
        commit(self.x, cols, x0_BR, conf_BR, window, self.rule.mask_token_id, selection)

    def _guided_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x``, followed under guidance by its unconditional copy (prompt replaced by mask tokens)."""
        if self.rule.cfg_scale <= 0:
            return x
        uncond = x.clone()
        uncond[:, : self.plan.prompt_length] = self.rule.mask_token_id
        return torch.cat([x, uncond])

    def _guided_mask(self) -> torch.Tensor | None:
        if self.attention_mask is None or self.rule.cfg_scale <= 0:
            return self.attention_mask
        return torch.cat([self.attention_mask, self.attention_mask])

    def _cached_logits(self, kv: KVCache, start: int, stop: int, cols: torch.Tensor) -> torch.Tensor:
        """Guided logits (B, R, V) at ``cols`` from a cached forward over the columns ``[start, stop)``."""
        assert isinstance(self.model, LLaDAModel)
        rows = cols - start

        def head(hidden_BSH: torch.Tensor, weight_VH: torch.Tensor) -> torch.Tensor:
            return F.linear(hidden_BSH.index_select(1, rows), weight_VH)

        ids = self._guided_input(self.x)[:, start:stop]
        logits_BRV = self.model.forward_cached(ids, kv, start, head=head, fused=self.fused)
        if self.rule.cfg_scale > 0:
            cond, uncond = logits_BRV.chunk(2)
            logits_BRV = guide(cond, uncond, self.rule.cfg_scale)
        return logits_BRV


class _Graphs:
    """Replays steps from CUDA graphs, one per key, all in one memory pool.

    The first call with a key runs the step eagerly on a side stream (warming up cuBLAS and the allocator, and
    doing the step's real work); that step is then captured, and later calls with the key replay it. A step must
    read and write only tensors that outlive its graph (static buffers), and must not synchronise with the host.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.pool: tuple[int, int] | None = None

    def run(self, key: Hashable, step: Callable[[], None]) -> None:
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            step()
            # Captured as torch.cuda.graph does, less its device synchronisation, gc.collect() and empty_cache(),
            # which would cost every capture (one per block in fast mode) milliseconds to tens of them.
            # thread_local: CUDA work of other threads (a data loader's pin-memory thread) must not break the capture.
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                step()
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.pool = graph.pool()
        self.graphs[key] = graph


class _GraphSteps:
    """Exact mode's steps from CUDA graphs (:class:`_Graphs`), one per distinct ``k`` (at most two per generation).

    The graphs read the candidate columns from a static buffer (:meth:`set_columns`, once per block), so one
    graph serves every block.
    """

    def __init__(self, denoiser: _Denoiser, block_length: int, device: torch.device) -> None:
        self.denoiser = denoiser
        self.cols = torch.empty(block_length, dtype=torch.long, device=device)
        self.graphs = _Graphs(device)

    def set_columns(self, cols: torch.Tensor) -> None:
        assert cols.shape == self.cols.shape, "graph steps need block_length candidate columns"
        self.cols.copy_(cols)

    def run(self, k: int) -> None:
        self.graphs.run(k, functools.partial(self.denoiser.step, self.cols, k))


def fused_by_default(model: nn.Module, device: torch.device) -> bool:
    """Whether inference on ``model`` runs its fused forward unless told otherwise: a plain :class:`LLaDAModel`
    on CUDA (see :func:`_graph_safe`). Shared by the sampler and :mod:`composer_dlm.likelihood`."""
    return device.type == "cuda" and _graph_safe(model)


def _graph_safe(model: nn.Module) -> bool:
    """Whether a step of ``model`` can be captured into a CUDA graph without the caller asking: a plain
    :class:`LLaDAModel` (other modules may synchronise with the host inside ``forward``), not sharded by FSDP
    (whose forward gathers parameters with collectives), and no autocast active (its weight cache would be
    captured)."""
    if not isinstance(model, LLaDAModel) or torch.is_autocast_enabled("cuda"):
        return False
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        sharded: tuple[type, ...] = (FullyShardedDataParallel,)
        try:
            from torch.distributed.fsdp import FSDPModule

            sharded += (FSDPModule,)
        except ImportError:  # torch < 2.6 has no FSDP2 export
            pass
        if any(isinstance(m, sharded) for m in model.modules()):
            return False
    return True


def full_logits(model: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L, V) logits of any module mapping ids to logits (or to an output with ``.logits``, as Hugging Face
    models return), passing the key mask only when there is one: the path for models other than LLaDAModel."""
    out = model(x) if attention_mask is None else model(x, attention_mask=attention_mask)
    return getattr(out, "logits", out)


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """The device of ``model``'s first parameter; ``fallback`` for a module without parameters."""
    param = next(model.parameters(), None)
    return param.device if param is not None else fallback
