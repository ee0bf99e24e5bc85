"""The layers LLaDA's network is made of that are plain torch: RMSNorm and rotary embeddings.

Shipped in every export beside ``modeling_llada.py`` (which imports them), and imported by composer-dlm's own
model (:mod:`composer_dlm.models.llada`), so both compute them with the same code. Needs only torch.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = (x * rsqrt(mean(x^2) + eps)) * weight, normalised in fp32 and cast back before the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed * self.weight.to(x.dtype)


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (seq_len, head_dim) in fp32; angle(p, i) = p * theta^(-2i/head_dim), i < head_dim/2,
    repeated for the second half so that position i and i + head_dim/2 share a frequency."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x_BHLD: torch.Tensor, cos_LD: torch.Tensor, sin_LD: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in fp32: x * cos + rotate_half(x) * sin, rotate_half(a, b) = (-b, a)."""
    x = x_BHLD.float()
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x * cos_LD + rotated * sin_LD).to(x_BHLD.dtype)
