"""The masked-diffusion forward process and LLaDA's loss normalisation, as pure functions.

Pretraining, for token ids x of shape (B, L):

    t_b ~ U(0, 1),  p_b = (1 - eps) * t_b + eps,  each x_bi is replaced by [MASK] with probability p_b
    loss = 1 / (B * L) * sum_{b, i masked} CE(logits_bi, x_bi) / p_b

SFT (``prompt_lengths`` given): prompt positions are never masked; with a_b = L - prompt_length_b the answer
length of row b (the EOS padding of the answer included),

    loss = 1 / B * sum_{b, i masked} CE(logits_bi, x_bi) / (p_b * a_b)

Both are ``sum_i w_i * CE_i`` with per-token weights ``w`` (zero where unmasked): :func:`loss_weights` gives
them, so the fused kernel computes the same loss without logits. The pretraining loss is an upper bound on
the negative log-likelihood in nats per token (the ELBO); :func:`elbo_denominator` says per how many tokens.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Literal

import torch
import torch.nn.functional as F

Mode = Literal["pretrain", "sft"]


@dataclasses.dataclass
class DiffusionConfig:
    """Masking settings (YAML section ``diffusion``)."""

    mode: Mode = "pretrain"
    eps: float = 1e-3
    random_length_prob: float = 0.01
    eval_seed: int = 1234

    def __post_init__(self) -> None:
        if self.mode not in ("pretrain", "sft"):
            raise ValueError(f"diffusion.mode must be 'pretrain' or 'sft', got {self.mode!r}")
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"diffusion.eps must be in [0, 1), got {self.eps}")
        if not 0.0 <= self.random_length_prob <= 1.0:
            raise ValueError(f"diffusion.random_length_prob must be in [0, 1], got {self.random_length_prob}")


def forward_process(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    eps: float = 1e-3,
    prompt_lengths: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks each token of row b independently with probability p_b = (1 - eps) * t_b + eps, t_b ~ U(0, 1).

    Returns ``(noisy_ids, masked, p_mask)``: the ids with masked positions set to ``mask_token_id``, the boolean
    (B, L) mask, and p_mask (B, L) in fp32. Positions before ``prompt_lengths[b]`` are never masked.
    Draws from ``generator`` when given, else from the global RNG of the tensors' device.
    """
    b, length = input_ids.shape
    device = input_ids.device
    t = torch.rand(b, device=device, generator=generator)
    p_mask = ((1.0 - eps) * t + eps)[:, None].expand(b, length)
    masked = torch.rand((b, length), device=device, generator=generator) < p_mask
    if prompt_lengths is not None:
        masked &= torch.arange(length, device=device)[None, :] >= prompt_lengths.to(device)[:, None]
    noisy_ids = input_ids.masked_fill(masked, mask_token_id)
    return noisy_ids, masked, p_mask


def answer_lengths(prompt_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Tokens after the prompt in each row, EOS padding included (what LLaDA's SFT loss divides by)."""
    return (seq_len - prompt_lengths).clamp_min(1)


def loss_weights(
    masked: torch.Tensor, p_mask: torch.Tensor, prompt_lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token weights w (B, L), fp32, with loss = sum w * CE; zero at unmasked positions."""
    b, length = masked.shape
    if prompt_lengths is None:
        denom = p_mask * (b * length)
    else:
        denom = p_mask * answer_lengths(prompt_lengths, length).to(p_mask)[:, None] * b
    return torch.where(
        masked, 1.0 / denom.float(), torch.zeros((), dtype=torch.float32, device=masked.device)
    )


def elbo_denominator(masked: torch.Tensor, prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """How many tokens the ELBO of a batch is spread over: B * L, or the summed answer lengths in SFT."""
    b, length = masked.shape
    if prompt_lengths is None:
        return torch.tensor(float(b * length), device=masked.device)
    return answer_lengths(prompt_lengths, length).sum().float()


def diffusion_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    masked: torch.Tensor,
    p_mask: torch.Tensor,
    prompt_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """LLaDA's loss from full logits (B, L, V); the plain-PyTorch path and the definition the fused path matches."""
    ce = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none")
    return (ce * loss_weights(masked, p_mask, prompt_lengths)[masked]).sum()


def random_truncation_length(seq_len: int, prob: float, *, seed: int, step: int, microbatch: int = 0) -> int:
    """LLaDA truncates a pretraining batch to a length U{1..L} with probability ``prob``.

    The draw is a pure function of (seed, step, microbatch), so every rank gets the same length (their shapes
    must agree under FSDP) and a resumed run repeats it without saved RNG state. Returns ``seq_len`` when the
    batch is left whole.
    """
    rng = random.Random(f"composer-dlm-random-length/{seed}/{step}/{microbatch}")
    if rng.random() >= prob:
        return seq_len
    return rng.randint(1, seq_len)
