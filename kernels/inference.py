"""Fused elementwise kernels for the no-grad forward (sampling), bit for bit equal to the eager ops they replace.

A LLaDA block run eagerly launches ~44 kernels, ~37 of them elementwise (the fp32 RMSNorm, the fp32 RoPE,
SiLU, products, residual adds). At batch 1 (384 tokens) each moves only a few MB, so their fixed cost adds up: an
8B forward replayed from a CUDA graph spends 14.2 ms on the H200, 10.2 ms with these kernels (and one stacked
q/k/v product), of which 8.2 ms are cuBLAS products. Per block they do the elementwise work in 7 launches, plus
PyTorch's own two row means:

- :func:`add_square`: ``s = a + b`` (the residual add) and ``s.float() ** 2`` (the RMSNorm's squares);
- :func:`rms_apply`: ``(x.float() * rsqrt(mean_sq + eps)).to(dtype) * weight`` given the row means;
- :func:`rope`: rotate-half RoPE in fp32 over every head of a (B, L, heads, head_dim) view;
- :func:`silu_mul`: ``silu(g) * u``.

They perform the eager ops' floating-point operations in the same order with the same roundings: every
intermediate that PyTorch stores (in bf16 or fp32) is rounded to that dtype here too; products are not
contracted into fused multiply-adds (``enable_fp_fusion=False``), since ``x * cos + r * sin`` rounds each
product in PyTorch; ``exp``, ``rsqrt`` and the division are libdevice's, as in PyTorch's CUDA kernels. The row
mean of the squares stays PyTorch's own reduction (its summation order is its own), so the sampler's outputs are
token for token those of the eager model; ``tests/test_inference_kernels.py`` checks every kernel and a whole
forward bitwise on the GPU.
"""

from __future__ import annotations

import math
import os

import torch

_EXACT = {"enable_fp_fusion": False}  # keep a * b + c as two roundings, as eager PyTorch computes it
_BLOCK = 1024


def _libdevice() -> bool:
    """libdevice's exp / rsqrt / division (as PyTorch's CUDA kernels) on the GPU; the CPU interpreter has none."""
    return os.environ.get("TRITON_INTERPRET") != "1"


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def add_square(a: torch.Tensor, b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, s.float() ** 2)`` with ``s = a + b`` in ``a``'s dtype (``s = a`` when ``b`` is None)."""
    from kernels import inference_triton as tk  # on first use: `import kernels` works without Triton

    a = a.contiguous()
    total = torch.empty_like(a) if b is not None else a
    sq = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    n = a.numel()
    other = b.contiguous() if b is not None else a
    grid = (math.ceil(n / _BLOCK),)
    tk.add_square_kernel[grid](a, other, total, sq, n, HAS_B=b is not None, BLOCK=_BLOCK, **_EXACT)
    return total, sq


def rms_apply(x: torch.Tensor, mean_sq: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x.float() * rsqrt(mean_sq + eps)).to(x.dtype) * weight.to(x.dtype)``; ``mean_sq`` (..., 1) fp32."""
    from kernels import inference_triton as tk  # on first use: `import kernels` works without Triton

    x = x.contiguous()
    h = x.shape[-1]
    out = torch.empty_like(x)
    grid = (x.numel() // h,)
    tk.rms_apply_kernel[grid](
        x,
        mean_sq.contiguous(),
        weight,
        out,
        h,
        eps,
        BLOCK=_pow2(h),
        LIBDEVICE=_libdevice(),
        **_EXACT,
    )
    return out


def rope(x_BLND: torch.Tensor, cos_LD: torch.Tensor, sin_LD: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of a (B, L, heads, head_dim) view whose last dimension is contiguous, computed in fp32 and
    returned contiguous (B, L, heads, head_dim) in ``x``'s dtype."""
    from kernels import inference_triton as tk  # on first use: `import kernels` works without Triton

    b, length, n_heads, head_dim = x_BLND.shape
    assert x_BLND.stride(-1) == 1 and cos_LD.is_contiguous() and sin_LD.is_contiguous()
    out = torch.empty((b, length, n_heads, head_dim), dtype=x_BLND.dtype, device=x_BLND.device)
    tk.rope_kernel[(b * length,)](
        x_BLND, cos_LD, sin_LD, out, length, n_heads, head_dim // 2, x_BLND.stride(0), x_BLND.stride(1),
        x_BLND.stride(2), HEADS=_pow2(n_heads), BLOCK_HALF=_pow2(head_dim // 2),
        **_EXACT,
    )  # fmt: skip
    return out


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``F.silu(g) * u``, the SiLU rounded to ``g``'s dtype before the product as eager PyTorch does."""
    from kernels import inference_triton as tk  # on first use: `import kernels` works without Triton

    g, u = g.contiguous(), u.contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    tk.silu_mul_kernel[(math.ceil(n / _BLOCK),)](g, u, out, n, BLOCK=_BLOCK, LIBDEVICE=_libdevice(), **_EXACT)
    return out
