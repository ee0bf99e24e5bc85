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
- confidence: ``softmax(l)[x0]`` computed in float64 (``low_confidence``), or ``u ~ U(0, 1)`` (``random``);
  positions that are not masked, and positions after the current block, never compete.

These are the semantics of LLaDA's reference ``generate.py``; at temperature 0 the output is token for token
what it returns (its ``add_gumbel_noise`` returns the logits unchanged there, so it takes the argmax of ``l``). That includes its quirk when the model predicts the mask token itself: committing it
leaves the position masked, so it stays a candidate (also in later blocks).

What differs is how the work is done, not the result: for a :class:`LLaDAModel` only the candidate rows go
through the output projection and the float64 softmax (the reference does every position's full vocabulary),
the commit is a batched selection on the device with a static ``k`` (no host synchronisation per step, no
Python loop over the batch; exact ties in confidence go to the leftmost position, which LLaDA's ``topk`` leaves
unspecified), on CUDA the model runs its fused forward (elementwise kernels that reproduce the eager ops bit for
bit, see :mod:`kernels.inference`), and at temperature 0 each step is replayed from a captured CUDA graph, which
removes the gaps between kernel launches. ``python scripts/benchmark.py sampler`` times it against a faithful
transcription of LLaDA's sampler on the same model in the same run and checks the tokens are identical; the
README's Benchmarks section gives the measured figures and what they ran on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from composer_dlm.models.llada import FusedInference, LLaDAModel

Remasking = Literal["low_confidence", "random"]
HeadRows = Literal["candidates", "all"]
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


@dataclasses.dataclass
class _Denoiser:
    """One denoising step, written so that it can run eagerly or be captured into a CUDA graph: static
    shapes, ``k`` a Python int, the candidate columns a device tensor, no host synchronisation."""

    model: nn.Module
    x: torch.Tensor  # (B, L) long, updated in place
    attention_mask: torch.Tensor | None  # (B, L) as the caller gave it, extended with ones over the answer
    prompt_length: int
    mask_token_id: int
    temperature: float
    cfg_scale: float
    remasking: Remasking
    eos_token_id: int | None
    min_new_tokens: int
    generator: torch.Generator | None
    head_rows: HeadRows
    fused: FusedInference | bool

    def logits(self, cols: torch.Tensor) -> torch.Tensor:
        """Logits (B, R, V) at the columns ``cols`` (R,), guidance and EOS suppression applied."""
        logits_BRV = guided_logits(
            self.model, self.x, self.attention_mask, cols, prompt_length=self.prompt_length,
            mask_token_id=self.mask_token_id, cfg_scale=self.cfg_scale, head_rows=self.head_rows,
            fused=self.fused,
        )  # fmt: skip
        if self.min_new_tokens > 0:
            assert self.eos_token_id is not None
            early = (cols - self.prompt_length) < self.min_new_tokens  # (R,)
            logits_BRV[:, :, self.eos_token_id].masked_fill_(early, float("-inf"))
        return logits_BRV

    def step(self, cols: torch.Tensor, k: int) -> None:
        """Predict at ``cols`` and commit the ``k`` most confident still-masked positions in each row."""
        logits_BRV = self.logits(cols)
        if self.temperature > 0:
            # Gumbel-max in float64: argmax exp(l) / (-log u)^T samples softmax(l / T). The float64 logits are kept
            # for the confidence below, whose conversion is then a no-op.
            logits_BRV = logits_BRV.to(torch.float64)
            u = torch.rand(
                logits_BRV.shape, dtype=torch.float64, device=logits_BRV.device, generator=self.generator
            )
            x0_BR = (logits_BRV.exp() / (-torch.log(u)) ** self.temperature).argmax(-1)
        else:
            x0_BR = logits_BRV.argmax(-1)
        if self.remasking == "low_confidence":
            probs = F.softmax(logits_BRV.to(torch.float64), dim=-1)
            conf_BR = probs.gather(-1, x0_BR.unsqueeze(-1)).squeeze(-1)
        else:
            conf_BR = torch.rand(
                x0_BR.shape, dtype=torch.float64, device=x0_BR.device, generator=self.generator
            )
        current_BR = self.x.index_select(1, cols)
        still_masked = current_BR == self.mask_token_id
        conf_BR = torch.where(still_masked, conf_BR, float("-inf"))
        # The k most confident; a stable sort breaks exact ties towards the leftmost position, on every device.
        top_BK = conf_BR.sort(dim=-1, descending=True, stable=True).indices[:, :k]
        chosen = torch.where(still_masked, x0_BR, current_BR).gather(1, top_BK)
        self.x.scatter_(1, cols[top_BK], chosen)


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

    Steps that commit nothing (more steps per block than block_length) are skipped: they would change nothing.
    """
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
    if fused and not plain_cuda:
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

    fused_options: FusedInference | bool = False
    if use_fused:
        assert isinstance(model, LLaDAModel)
        fused_options = model.fused_inference(torch.cat([x, x]) if cfg_scale > 0 else x)
    denoiser = _Denoiser(
        model, x, full_mask, prompt_length, mask_token_id, temperature, cfg_scale, remasking,
        eos_token_id, min_new_tokens, generator, head_rows, fused_options,
    )  # fmt: skip
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


class _GraphSteps:
    """Replays the denoising step from CUDA graphs, one per distinct ``k`` (at most two per generation).

    The graphs read the candidate columns from a static buffer (:meth:`set_columns`, once per block), so one
    graph serves every block. The first step with a given ``k`` runs eagerly on a side stream (warming up cuBLAS
    and the allocator, and doing the step's real work); that step is then captured, and later steps replay it.
    """

    def __init__(self, denoiser: _Denoiser, block_length: int, device: torch.device) -> None:
        self.denoiser = denoiser
        self.cols = torch.empty(block_length, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool: tuple[int, int] | None = None

    def set_columns(self, cols: torch.Tensor) -> None:
        assert cols.shape == self.cols.shape, "graph steps need block_length candidate columns"
        self.cols.copy_(cols)

    def run(self, k: int) -> None:
        graph = self.graphs.get(k)
        if graph is not None:
            graph.replay()
            return
        device = self.cols.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.denoiser.step(self.cols, k)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads (a data loader's pin-memory thread) must not break the capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.denoiser.step(self.cols, k)
        self.pool = graph.pool()
        self.graphs[k] = graph


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
