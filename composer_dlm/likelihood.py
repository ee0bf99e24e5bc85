"""Monte-Carlo estimate of log p(answer | prompt) under a masked diffusion model, as LLaDA evaluates it.

Only answer tokens are masked. For a batch of ``n`` Monte-Carlo rows and an answer of ``A`` tokens, row ``j``
masks ``k_j`` uniformly chosen answer positions, with the counts spread evenly over [1, A] from a random
offset ``o ~ U{1..A}`` (stratified, which lowers the variance against drawing each count independently)::

    k_j = ((round(o + j * A / n) - 1) mod A) + 1,        j = 0 .. n-1      (round half to even)

and the row's loss is the masked cross-entropy weighted by the inverse mask ratio::

    loss_j = sum over masked i of -log p(answer_i | masked sequence) / (k_j / A)

The estimate is ``-mean_j loss_j`` over all ``num_samples`` rows (drawn ``batch_size`` rows at a time, the last
batch smaller when ``batch_size`` does not divide ``num_samples``). Given ``k_j``, the masked positions are a
uniform ``k_j``-subset, and since the offset is uniform so is each ``k_j`` on [1, A]; ``loss_j`` is then an
unbiased estimate of the negative diffusion ELBO, a lower bound on log p(answer | prompt). (Where
``o + j * A / n`` lands exactly on a half, round-half-to-even favours even counts; LLaDA's code, which uses the
same rounding, has the same slight tilt, and ``n`` a multiple of ``A`` by an odd factor avoids it.) LLaDA
scores answers and choices this way (its ``get_log_likelihood.py``).

How the work is done (:func:`mc_log_likelihoods`): the Monte-Carlo rows of many requests are packed into
forwards of up to ``batch_tokens`` tokens (right-padded, padding hidden from attention by the key mask), the last
block of a :class:`LLaDAModel` computes its output only over each row's answer span (the widest answer of the
forward; its keys and values still cover every position), only the masked answer positions go through the output
projection and the cross-entropy, on CUDA the model runs its fused inference forward, and the per-request sums
stay on the device until the end. The masks are drawn per request exactly as one request alone draws them, so
the estimate of a request does not depend on what it is packed with (up to floating-point rounding of
differently shaped matrix products). Rows that are the same input -- the same prompt and the same noised answer,
as every row of a one-token answer is after a shared context (MMLU's four choices), or a fully masked row of
equal-length choices -- go through the model once, and each request reads its own targets from that forward.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from composer_dlm.generate import full_logits, fused_by_default, guide, model_device
from composer_dlm.models.llada import FusedInference, LLaDAModel

TokenIds = torch.Tensor | Sequence[int]
HEAD_ROWS = 2048
"""Masked positions projected to the vocabulary at a time (bounds the (rows, vocabulary) logits in memory)."""


def mask_counts(answer_length: int, num_rows: int, offset: int) -> torch.Tensor:
    """The masked count of each of ``num_rows`` rows: ``offset + j * answer_length / num_rows``, rounded half to
    even and wrapped into [1, answer_length]. ``offset`` lies in [1, answer_length].

    >>> mask_counts(8, 4, 3).tolist()
    [3, 5, 7, 1]
    """
    if answer_length <= 0 or num_rows <= 0:
        raise ValueError(f"need answer_length > 0 and num_rows > 0, got {answer_length} and {num_rows}")
    if not 1 <= offset <= answer_length:
        raise ValueError(f"offset must lie in [1, answer_length={answer_length}], got {offset}")
    spread = offset + torch.arange(num_rows, dtype=torch.float64) * (answer_length / num_rows)
    counts = torch.round(spread).long()
    return (counts - 1) % answer_length + 1


def draw_masks(
    answer_length: int, *, num_samples: int, batch_size: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masks of all ``num_samples`` rows of one request: ``masked_NA`` (num_samples, answer_length) bool and
    the counts ``k_N``, stratified within each batch of ``batch_size`` rows (the last one smaller).

    Per batch, one offset ``o ~ U{1..A}`` and then one uniform permutation per row are drawn from ``generator``
    (on the CPU); the positions whose permutation value is below ``k_j`` are a uniform ``k_j``-subset."""
    full, rest = divmod(num_samples, batch_size)
    masks, counts = [], []
    for rows in [batch_size] * full + ([rest] if rest else []):
        offset = int(torch.randint(1, answer_length + 1, (), generator=generator))
        k_N = mask_counts(answer_length, rows, offset)
        perm_NA = torch.rand((rows, answer_length), generator=generator).argsort(dim=1)
        masks.append(perm_NA < k_N[:, None])
        counts.append(k_N)
    return torch.cat(masks), torch.cat(counts)


def _as_ids(ids: TokenIds, name: str) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long) if not isinstance(ids, torch.Tensor) else ids.long()
    if ids.dim() != 1:
        raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    return ids.cpu()


@torch.no_grad()
def mc_log_likelihood(
    model: nn.Module,
    prompt_ids: TokenIds,
    answer_ids: TokenIds,
    *,
    mask_token_id: int,
    num_samples: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> float:
    """Monte-Carlo estimate of log p(answer | prompt) (natural log, summed over the answer's tokens).

    Args:
        model: a :class:`LLaDAModel` or any module mapping input ids (N, L) to logits (N, L, V); eval mode.
        prompt_ids, answer_ids: 1-D token ids; the answer must be non-empty. Neither may hold the mask token.
        num_samples: Monte-Carlo rows in all (LLaDA uses 128, and 1 for single-token answers, where the estimate
            is exact).
        batch_size: the masked counts are stratified within each batch of this many rows.
        cfg_scale: unsupervised classifier-free guidance scale (0 disables it).
        generator: a CPU ``torch.Generator`` for the offsets and masked positions; fix its seed for numbers
            that are comparable across checkpoints and devices. ``None`` uses the global CPU generator.
    """
    return mc_log_likelihoods(
        model,
        [(prompt_ids, answer_ids)],
        mask_token_id=mask_token_id,
        num_samples=num_samples,
        batch_size=batch_size,
        cfg_scale=cfg_scale,
        generators=[generator],
    )[0]


@torch.no_grad()
def mc_log_likelihoods(
    model: nn.Module,
    requests: Sequence[tuple[TokenIds, TokenIds]],
    *,
    mask_token_id: int,
    num_samples: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    generators: Sequence[torch.Generator | None] | None = None,
    batch_tokens: int = 32768,
    fused: bool | None = None,
) -> list[float]:
    """:func:`mc_log_likelihood` of many ``(prompt_ids, answer_ids)`` requests, their rows packed together.

    ``generators[i]`` draws the masks of request ``i`` (``None``: the global CPU generator, in request order);
    with the same generator state a request gets the estimate :func:`mc_log_likelihood` gives it alone.
    ``batch_tokens`` bounds the tokens of one forward (rows times the longest row, doubled with guidance); a
    row longer than that runs alone. ``fused`` runs the model's fused inference forward (default: on for a
    plain :class:`LLaDAModel` on CUDA). A module other than :class:`LLaDAModel` must take ``attention_mask=``
    (B, L) when requests of different lengths share a forward.
    """
    prompts = [_as_ids(p, "prompt_ids") for p, _ in requests]
    answers = [_as_ids(a, "answer_ids") for _, a in requests]
    if generators is None:
        generators = [None] * len(requests)
    if len(generators) != len(requests):
        raise ValueError(f"{len(generators)} generators for {len(requests)} requests")
    _check(prompts, answers, mask_token_id, num_samples, batch_size, cfg_scale, batch_tokens, generators)
    if not requests:
        return []
    device = model_device(model, torch.device("cpu"))
    use_fused = fused_by_default(model, device) if fused is None else fused
    draws = [
        draw_masks(a.numel(), num_samples=num_samples, batch_size=batch_size, generator=g)
        for a, g in zip(answers, generators, strict=True)
    ]
    totals = torch.zeros(len(requests), dtype=torch.float64, device=device)
    fused_options: FusedInference | bool = use_fused
    noised = [torch.where(masked, mask_token_id, a) for (masked, _), a in zip(draws, answers, strict=True)]
    groups = _identical_rows(prompts, noised)
    lengths = [prompts[g[0][0]].numel() + answers[g[0][0]].numel() for g in groups]
    for chunk in _pack(lengths, batch_tokens, cfg_scale > 0):
        batch = _Batch.build(
            [groups[i] for i in chunk], prompts, answers, noised, draws, mask_token_id, cfg_scale > 0
        )
        if use_fused and isinstance(model, LLaDAModel) and fused_options is True:
            fused_options = model.fused_inference(batch.x_NW.to(device))  # stacked q/k/v where exact
        nll_M = _masked_nll(model, batch, device, cfg_scale, fused_options)
        weighted = nll_M.double() * batch.weight_M.to(device)
        totals.index_add_(0, batch.request_M.to(device), weighted)
    return [-float(t) / num_samples for t in totals.cpu()]


def _check(
    prompts: list[torch.Tensor],
    answers: list[torch.Tensor],
    mask_token_id: int,
    num_samples: int,
    batch_size: int,
    cfg_scale: float,
    batch_tokens: int,
    generators: Sequence[torch.Generator | None],
) -> None:
    if batch_size <= 0 or num_samples <= 0:
        raise ValueError(f"num_samples ({num_samples}) and batch_size ({batch_size}) must be positive")
    if batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        where = "" if len(prompts) == 1 else f"request {i}: "
        if answer.numel() == 0:
            raise ValueError(f"{where}answer_ids is empty: there is nothing to score")
        if (prompt == mask_token_id).any() or (answer == mask_token_id).any():
            raise ValueError(f"{where}prompt or answer contains the mask token ({mask_token_id})")
    for g in generators:
        if g is not None and g.device.type != "cpu":
            raise ValueError(
                f"generator must be a CPU generator (the masks are drawn on the CPU), got {g.device}"
            )


Row = tuple[int, int]
"""(request, Monte-Carlo row) of one noised input."""


def _identical_rows(prompts: list[torch.Tensor], noised: list[torch.Tensor]) -> list[list[Row]]:
    """Every Monte-Carlo row of every request (``noised[r]``: request r's noised answers, a row each), grouped
    by input: the rows of a group have the same prompt and the same noised answer (hence the same masked
    positions), so one forward serves them all. Groups are in order of their first row."""
    prompt_ids: dict[bytes, int] = {}
    groups: dict[tuple[int, bytes], list[Row]] = {}
    for r, (prompt, noised_NA) in enumerate(zip(prompts, noised, strict=True)):
        p = prompt_ids.setdefault(prompt.numpy().tobytes(), len(prompt_ids))
        for j, row in enumerate(noised_NA.numpy()):
            groups.setdefault((p, row.tobytes()), []).append((r, j))
    return list(groups.values())


def _pack(lengths: list[int], batch_tokens: int, cfg: bool) -> list[list[int]]:
    """Forwards of at most ``batch_tokens`` tokens (rows times the widest row, doubled with guidance), each a list
    of indices into ``lengths``, longest rows first so that rows packed together pad little; a row longer than
    ``batch_tokens`` runs alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    passes = 2 if cfg else 1
    chunks: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # the first row of a chunk is its widest
        if current and (len(current) + 1) * width * passes > batch_tokens:
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return chunks


@dataclasses.dataclass(frozen=True)
class _Batch:
    """One packed forward: the noised rows ``x_NW`` (guidance: followed by their unconditional copies), the key
    mask where rows differ in length, each row's answer span ``span_NR`` (its columns ``prompt + 0 .. R-1`` for
    the widest answer R of the forward, clamped to the row width: the positions whose last-block output is
    computed), and per masked answer position its row, index in the span (its column is ``span_NR[row, slot]``),
    target token, weight ``A / k`` and request."""

    x_NW: torch.Tensor
    mask_NW: torch.Tensor | None
    span_NR: torch.Tensor
    row_M: torch.Tensor
    slot_M: torch.Tensor
    target_M: torch.Tensor
    weight_M: torch.Tensor
    request_M: torch.Tensor

    @classmethod
    def build(
        cls,
        chunk: list[list[Row]],
        prompts: list[torch.Tensor],
        answers: list[torch.Tensor],
        noised: list[torch.Tensor],
        draws: list[tuple[torch.Tensor, torch.Tensor]],
        mask_token_id: int,
        cfg: bool,
    ) -> _Batch:
        """The forward of ``chunk``'s groups of identical rows, one model row per group (its first member's)."""
        firsts = [group[0][0] for group in chunk]
        width = max(prompts[r].numel() + answers[r].numel() for r in firsts)
        x_NW = torch.full((len(chunk), width), mask_token_id, dtype=torch.long)
        lengths_N = torch.empty(len(chunk), dtype=torch.long)
        prompt_N = torch.empty(len(chunk), dtype=torch.long)
        # Per request, the model rows (n) and Monte-Carlo rows (j) it writes and reads: the work below is then a
        # few tensor operations per request rather than per row.
        writes: dict[int, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        reads: dict[int, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for n, group in enumerate(chunk):
            writes[group[0][0]][0].append(n)
            writes[group[0][0]][1].append(group[0][1])
            for r, j in group:
                reads[r][0].append(n)
                reads[r][1].append(j)
        for r, (ns, js) in writes.items():
            p, a = prompts[r].numel(), answers[r].numel()
            n_N = torch.tensor(ns)
            x_NW[n_N, :p] = prompts[r]
            x_NW[n_N, p : p + a] = noised[r][js]
            lengths_N[n_N], prompt_N[n_N] = p + a, p
        rows, slots, targets, weights, owners = [], [], [], [], []
        for r, (ns, js) in reads.items():
            row, col = draws[r][0][js].nonzero(as_tuple=True)
            rows.append(torch.tensor(ns)[row])
            slots.append(col)
            targets.append(answers[r][col])
            weights.append(answers[r].numel() / draws[r][1][js][row].double())
            owners.append(torch.full_like(row, r))
        columns = torch.arange(width)
        mask_NW = (columns < lengths_N[:, None]) if bool((lengths_N < width).any()) else None
        widest = max(answers[r].numel() for r in firsts)
        span_NR = (prompt_N[:, None] + torch.arange(widest)).clamp(max=width - 1)
        if cfg:
            uncond = x_NW.masked_fill(columns < prompt_N[:, None], mask_token_id)
            x_NW = torch.cat([x_NW, uncond])
            mask_NW = torch.cat([mask_NW, mask_NW]) if mask_NW is not None else None
            span_NR = torch.cat([span_NR, span_NR])
        return cls(
            x_NW=x_NW,
            mask_NW=mask_NW,
            span_NR=span_NR,
            row_M=torch.cat(rows),
            slot_M=torch.cat(slots),
            target_M=torch.cat(targets),
            weight_M=torch.cat(weights),
            request_M=torch.cat(owners),
        )


def _masked_nll(
    model: nn.Module, batch: _Batch, device: torch.device, cfg_scale: float, fused: FusedInference | bool
) -> torch.Tensor:
    """-log p(target) at every masked position (M,), float32, with guidance when ``cfg_scale > 0``.

    A :class:`LLaDAModel` computes its last block over the answer spans only and projects only the masked
    positions' hidden states (inside its forward, where FSDP would have the output weight gathered); other modules
    return full logits, which are then indexed."""
    x_NW = batch.x_NW.to(device, non_blocking=True)
    mask_NW = batch.mask_NW.to(device, non_blocking=True) if batch.mask_NW is not None else None
    row_M = batch.row_M.to(device)
    target_M = batch.target_M.to(device)
    half = x_NW.shape[0] // 2 if cfg_scale > 0 else 0

    span_NR, slot_M = batch.span_NR.to(device, non_blocking=True), batch.slot_M.to(device)

    def nll(project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Cross-entropy at the masked positions, ``project(rows, slots)`` giving the logits at those rows and
        answer-span slots, a slice at a time."""
        pieces = [torch.zeros(0, device=device)]
        for s in range(0, row_M.numel(), HEAD_ROWS):
            rows, slots = row_M[s : s + HEAD_ROWS], slot_M[s : s + HEAD_ROWS]
            logits_MV = project(rows, slots)
            if cfg_scale > 0:
                logits_MV = guide(logits_MV, project(rows + half, slots), cfg_scale)
            pieces.append(F.cross_entropy(logits_MV.float(), target_M[s : s + HEAD_ROWS], reduction="none"))
        return torch.cat(pieces)

    if isinstance(model, LLaDAModel):

        def head(hidden_NRH: torch.Tensor, weight_VH: torch.Tensor) -> torch.Tensor:
            return nll(lambda rows, slots: F.linear(hidden_NRH[rows, slots], weight_VH))

        return model(x_NW, attention_mask=mask_NW, head=head, fused=fused, positions=span_NR)
    logits_NWV = full_logits(model, x_NW, mask_NW)
    return nll(lambda rows, slots: logits_NWV[rows, span_NR[rows, slots]])


@torch.no_grad()
def score_choices(
    model: nn.Module,
    prompt_ids: torch.Tensor | Sequence[int],
    choices: Sequence[torch.Tensor | Sequence[int]],
    *,
    mask_token_id: int,
    num_samples: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """:func:`mc_log_likelihood` of each choice after the same prompt.

    Every choice is scored with a generator seeded with ``seed`` (common random numbers: equal-length
    choices see the same masks, so their comparison is less noisy than independent draws would make it).
    """
    if not choices:
        raise ValueError("choices is empty")
    return mc_log_likelihoods(  # all choices in the same packed forwards
        model,
        [(prompt_ids, choice) for choice in choices],
        mask_token_id=mask_token_id,
        num_samples=num_samples,
        batch_size=batch_size,
        cfg_scale=cfg_scale,
        generators=[torch.Generator().manual_seed(seed) for _ in choices],
    )
