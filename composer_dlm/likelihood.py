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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from composer_dlm.generate import guided_logits, model_device


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


def _as_ids(ids: torch.Tensor | Sequence[int], name: str) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long) if not isinstance(ids, torch.Tensor) else ids.long()
    if ids.dim() != 1:
        raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    return ids


@torch.no_grad()
def mc_log_likelihood(
    model: nn.Module,
    prompt_ids: torch.Tensor | Sequence[int],
    answer_ids: torch.Tensor | Sequence[int],
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
        batch_size: rows per forward; the masked counts are stratified within each batch.
        cfg_scale: unsupervised classifier-free guidance scale (0 disables it).
        generator: a CPU ``torch.Generator`` for the offsets and masked positions; fix its seed for numbers
            that are comparable across checkpoints and devices. ``None`` uses the global CPU generator.
    """
    prompt = _as_ids(prompt_ids, "prompt_ids")
    answer = _as_ids(answer_ids, "answer_ids")
    if answer.numel() == 0:
        raise ValueError("answer_ids is empty: there is nothing to score")
    if batch_size <= 0 or num_samples <= 0:
        raise ValueError(f"num_samples ({num_samples}) and batch_size ({batch_size}) must be positive")
    if (prompt == mask_token_id).any() or (answer == mask_token_id).any():
        raise ValueError(f"prompt or answer contains the mask token ({mask_token_id})")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU generator (the masks are drawn on the CPU), got {generator.device}"
        )
    device = model_device(model, prompt.device)

    prompt_length, answer_length = prompt.numel(), answer.numel()
    seq = torch.cat([prompt, answer]).to(device)
    answer_dev = answer.to(device)
    answer_cols = torch.arange(prompt_length, prompt_length + answer_length, device=device)
    full, rest = divmod(num_samples, batch_size)
    total = 0.0
    for rows in [batch_size] * full + ([rest] if rest else []):
        offset = int(torch.randint(1, answer_length + 1, (), generator=generator))
        counts = mask_counts(answer_length, rows, offset)
        # A uniformly random permutation per row; the positions holding its values below k_j are a uniform
        # k_j-subset of the answer.
        perm = torch.rand((rows, answer_length), generator=generator).argsort(dim=1)
        masked_NA = (perm < counts[:, None]).to(device)
        x_NL = seq.expand(rows, -1).clone()
        x_NL[:, prompt_length:][masked_NA] = mask_token_id
        logits_NAV = guided_logits(
            model, x_NL, None, answer_cols, prompt_length=prompt_length, mask_token_id=mask_token_id,
            cfg_scale=cfg_scale,
        )  # fmt: skip
        nll_NA = F.cross_entropy(
            logits_NAV.float().flatten(0, 1), answer_dev.expand(rows, -1).flatten(), reduction="none"
        ).view(rows, answer_length)
        weights_N = answer_length / counts.to(device=device, dtype=torch.float32)
        total += float((torch.where(masked_NA, nll_NA, 0.0).sum(dim=1) * weights_N).sum())
    return -total / num_samples


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
    return [
        mc_log_likelihood(
            model,
            prompt_ids,
            choice,
            mask_token_id=mask_token_id,
            num_samples=num_samples,
            batch_size=batch_size,
            cfg_scale=cfg_scale,
            generator=torch.Generator().manual_seed(seed),
        )
        for choice in choices
    ]
