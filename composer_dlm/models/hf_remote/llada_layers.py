"""The layers LLaDA's network is made of that are plain torch: RMSNorm, rotary embeddings and attention.

Shipped in every export beside ``modeling_llada.py`` (which imports them), and imported by composer-dlm's own
model (:mod:`composer_dlm.models.llada`), so both compute them with the same code. Needs only torch.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
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
    """cos and sin tables (seq_len, head_dim) in fp32; angle(p, i) = p / theta^(2i/head_dim), i < head_dim/2,
    repeated for the second half so that position i and i + head_dim/2 share a frequency.

    Computed on the CPU and then moved to ``device``, as LLaDA's modeling file does (it builds its tables once, on
    the CPU, when the model is made): a GPU's sin and cos round differently in the last bit, which moves bf16 q
    and k now and then and with them the sampler's tokens. Cached per length and device (read-only tensors)."""
    return _rope_tables(seq_len, head_dim, float(theta), torch.device(device))


@functools.lru_cache(maxsize=32)
def _rope_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Built outside inference mode even when first asked for inside it: the cached tables also serve training,
    # where autograd saves them (an inference tensor cannot be saved for backward).
    with torch.inference_mode(False):
        # 1 / theta^(2i/d), as LLaDA computes it: theta^(-2i/d) rounds differently in fp32 (and moves bf16 q, k)
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(device), angles.sin().to(device)


def apply_rope(x_BHLD: torch.Tensor, cos_LD: torch.Tensor, sin_LD: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in fp32: x * cos + rotate_half(x) * sin, rotate_half(a, b) = (-b, a)."""
    x = x_BHLD.float()
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x * cos_LD + rotated * sin_LD).to(x_BHLD.dtype)


def attend(
    q_BHLD: torch.Tensor, k_BKLD: torch.Tensor, v_BKLD: torch.Tensor, key_mask_B11L: torch.Tensor | None
) -> torch.Tensor:
    """Bidirectional attention softmax(q k^T / sqrt(head_dim)) v of (B, heads, R, head_dim) q over (B, kv_heads, L,
    head_dim) k, v (R = L, or fewer queries than keys; kv_heads divides heads: grouped-query attention), returned
    as (B, R, heads * head_dim) for the output projection."""
    b, n_heads, length, _ = q_BHLD.shape
    n_kv_heads = k_BKLD.shape[1]
    if n_kv_heads != n_heads:
        groups = n_heads // n_kv_heads
        k_BKLD = k_BKLD.repeat_interleave(groups, dim=1)
        v_BKLD = v_BKLD.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q_BHLD, k_BKLD, v_BKLD, attn_mask=key_mask_B11L, is_causal=False)
    return out.transpose(1, 2).reshape(b, length, -1)
