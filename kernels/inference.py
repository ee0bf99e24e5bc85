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

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_EXACT = {"enable_fp_fusion": False}  # keep a * b + c as two roundings, as eager PyTorch computes it
_BLOCK = 1024


def _libdevice() -> bool:
    """libdevice's exp / rsqrt / division (as PyTorch's CUDA kernels) on the GPU; the CPU interpreter has none."""
    return os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def _add_square_kernel(a_ptr, b_ptr, sum_ptr, sq_ptr, n, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(a_ptr + offs, mask=inside).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + offs, mask=inside).to(tl.float32)
        s = (x + b).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offs, s, mask=inside)
        x = s.to(tl.float32)
    tl.store(sq_ptr + offs, x * x, mask=inside)


@triton.jit
def _rms_apply_kernel(
    x_ptr, mean_sq_ptr, w_ptr, out_ptr, H, eps, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=inside).to(tl.float32)
    if LIBDEVICE:
        scale = libdevice.rsqrt(tl.load(mean_sq_ptr + row) + eps)
    else:  # the CPU interpreter has no libdevice
        scale = tl.math.rsqrt(tl.load(mean_sq_ptr + row) + eps)
    normed = (x * scale).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=inside).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * H + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, L, n_heads, half, stride_b, stride_l, stride_h,
    HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b, pos = pid // L, pid % L
    heads = tl.arange(0, HEADS)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    inside = (heads < n_heads) & (d < half)
    src = x_ptr + b.to(tl.int64) * stride_b + pos.to(tl.int64) * stride_l + heads * stride_h + d
    x1 = tl.load(src, mask=inside).to(tl.float32)
    x2 = tl.load(src + half, mask=inside).to(tl.float32)
    table = pos.to(tl.int64) * (2 * half) + d
    in_table = d < half
    cos1, cos2 = tl.load(cos_ptr + table, mask=in_table), tl.load(cos_ptr + table + half, mask=in_table)
    sin1, sin2 = tl.load(sin_ptr + table, mask=in_table), tl.load(sin_ptr + table + half, mask=in_table)
    dst = out_ptr + (pid.to(tl.int64) * n_heads + heads) * (2 * half) + d
    tl.store(dst, (x1 * cos1 + (-x2) * sin1).to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(dst + half, (x2 * cos2 + x1 * sin2).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(g_ptr + offs, mask=inside).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=inside).to(tl.float32)
    if LIBDEVICE:
        silu = libdevice.div_rn(g, 1.0 + libdevice.exp(-g))
    else:
        silu = g / (1.0 + tl.exp(-g))
    silu = silu.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offs, (silu * u).to(out_ptr.dtype.element_ty), mask=inside)


def add_square(a: torch.Tensor, b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, s.float() ** 2)`` with ``s = a + b`` in ``a``'s dtype (``s = a`` when ``b`` is None)."""
    a = a.contiguous()
    total = torch.empty_like(a) if b is not None else a
    sq = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    n = a.numel()
    other = b.contiguous() if b is not None else a
    grid = (triton.cdiv(n, _BLOCK),)
    _add_square_kernel[grid](a, other, total, sq, n, HAS_B=b is not None, BLOCK=_BLOCK, **_EXACT)
    return total, sq


def rms_apply(x: torch.Tensor, mean_sq: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x.float() * rsqrt(mean_sq + eps)).to(x.dtype) * weight.to(x.dtype)``; ``mean_sq`` (..., 1) fp32."""
    x = x.contiguous()
    h = x.shape[-1]
    out = torch.empty_like(x)
    grid = (x.numel() // h,)
    _rms_apply_kernel[grid](
        x,
        mean_sq.contiguous(),
        weight,
        out,
        h,
        eps,
        BLOCK=triton.next_power_of_2(h),
        LIBDEVICE=_libdevice(),
        **_EXACT,
    )
    return out


def rope(x_BLND: torch.Tensor, cos_LD: torch.Tensor, sin_LD: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of a (B, L, heads, head_dim) view whose last dimension is contiguous, computed in fp32 and
    returned contiguous (B, L, heads, head_dim) in ``x``'s dtype."""
    b, length, n_heads, head_dim = x_BLND.shape
    assert x_BLND.stride(-1) == 1 and cos_LD.is_contiguous() and sin_LD.is_contiguous()
    out = torch.empty((b, length, n_heads, head_dim), dtype=x_BLND.dtype, device=x_BLND.device)
    _rope_kernel[(b * length,)](
        x_BLND, cos_LD, sin_LD, out, length, n_heads, head_dim // 2, x_BLND.stride(0), x_BLND.stride(1),
        x_BLND.stride(2), HEADS=triton.next_power_of_2(n_heads), BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        **_EXACT,
    )  # fmt: skip
    return out


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``F.silu(g) * u``, the SiLU rounded to ``g``'s dtype before the product as eager PyTorch does."""
    g, u = g.contiguous(), u.contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    _silu_mul_kernel[(triton.cdiv(n, _BLOCK),)](g, u, out, n, BLOCK=_BLOCK, LIBDEVICE=_libdevice(), **_EXACT)
    return out
