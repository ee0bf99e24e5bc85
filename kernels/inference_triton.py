"""Triton kernels of :mod:`kernels.inference` (imported on first use, so `import kernels` needs no Triton)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def add_square_kernel(a_ptr, b_ptr, sum_ptr, sq_ptr, n, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
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
def rms_apply_kernel(
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
def rope_kernel(
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
def silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
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
