"""The Triton grouped GEMM of :mod:`kernels.grouped_mm` (the path of torch < 2.8 on CUDA), with its backward.

Imported only when that path runs, so that ``import kernels`` works where torch ships without Triton. The
product is registered as the custom op ``composer_dlm::grouped_mm`` (with ``composer_dlm::grouped_mm_weight_grad``
for its backward), so ``torch.compile`` keeps it in the graph as one opaque node: no graph break.

Shapes: x (M, K) rows sorted by expert, w (E, N, K) (``nn.Linear``'s layout per expert), ends (E,) on the
device, group e = rows [ends[e-1], ends[e]). Nothing is read on the host:

- forward, y[r] = x[r] @ w[e].T: the grid is the static bound (cdiv(M, BM) + E) * cdiv(N, BN) (each group adds
  at most one partial row tile). Each program loads ``ends``, forms the per-expert tile counts and their
  prefix sum, and finds its expert and row offset. Programs past the real tiles zero the rows past ends[E-1]
  (there are always enough of them), so the whole output is defined.
- d(x) = the same kernel on (dy, w transposed), a strided view: d(x)[r] = dy[r] @ w[e].
- d(w)[e] = dy_e.T @ x_e: one program per (expert, N tile, K tile) walks that expert's rows (bounds read from
  ``ends`` in the kernel); an empty group gives a zero gradient; rows past ends[E-1] are never read.

Products accumulate in float32 and are written in the inputs' dtype; float32 inputs multiply in IEEE float32
(no TF32, as torch's default matmul).

Tiles are fixed per device and dtype (:func:`default_config`), not autotuned, so nothing is timed or recompiled
per batch (Triton specialises only on the integers' divisibility by 16). Compiled ahead of time for sm_90 with the
pinned Triton 3.3, the 16-bit kernels use wgmma with a cp.async pipeline of ``num_stages`` buffers (128 KiB of
shared memory for the product, 96 KiB for d(w)). ``python scripts/benchmark.py moe --grouped-gemm`` times them
against torch's grouped GEMM and a few other tile sizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import triton
import triton.language as tl


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One kernel's launch: a (block_m, block_n) output tile with a reduction step of block_k (for d(w): block_n x
    block_k outputs with a reduction step of block_m rows)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def launch_args(self, dtype: torch.dtype) -> dict[str, Any]:
        """The kernels' tile constants and launch options (float32 operands multiply in IEEE float32)."""
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "BLOCK_K": self.block_k,
            "IEEE": dtype == torch.float32,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }


@dataclasses.dataclass(frozen=True)
class GroupedMMConfig:
    product: Tiles  # y and d(x)
    weight_grad: Tiles  # d(w)


# Hopper, 16-bit: 128x128 tiles fill the tensor cores with eight warps.
GPU_16BIT = GroupedMMConfig(Tiles(128, 128, 64, 8, 4), Tiles(64, 128, 128, 8, 3))
# float32 multiplies on the CUDA cores (IEEE): smaller tiles.
GPU_FLOAT32 = GroupedMMConfig(Tiles(64, 64, 32, 4, 3), Tiles(32, 64, 64, 4, 3))
# The CPU interpreter (tests): tiles smaller than the test shapes so that every loop and mask runs.
INTERPRETER = GroupedMMConfig(Tiles(32, 32, 16, 4, 1), Tiles(16, 32, 16, 4, 1))


def default_config(x: torch.Tensor) -> GroupedMMConfig:
    """The launch settings for operands like ``x`` (device and dtype decide)."""
    if not x.is_cuda:
        return INTERPRETER
    return GPU_FLOAT32 if x.dtype == torch.float32 else GPU_16BIT


@triton.jit
def _grouped_mm_kernel(
    x_ptr,  # (M, K)
    w_ptr,  # (E, N, K), any strides
    y_ptr,  # (M, N) out
    ends_ptr,  # (E,) int
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    E: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    tile = pid // num_n
    cols = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Groups and their row tiles, from `ends` (device memory): group e's tiles are [tile_ends[e] - tiles[e],
    # tile_ends[e]); the expert of this program's tile is the number of groups whose tiles end at or before it.
    e_offs = tl.arange(0, BLOCK_E)
    ends = tl.minimum(tl.load(ends_ptr + e_offs, mask=e_offs < E, other=0).to(tl.int32), M)
    starts = tl.minimum(
        tl.load(ends_ptr + e_offs - 1, mask=(e_offs > 0) & (e_offs < E), other=0).to(tl.int32), M
    )
    tiles = tl.cdiv(tl.maximum(ends - starts, 0), BLOCK_M)
    tile_ends = tl.cumsum(tiles, 0)
    expert = tl.sum((tile_ends <= tile).to(tl.int32), 0)
    # A spare program (expert == E) takes the (tile - total)-th block of the rows past the last group, with an
    # empty reduction: it writes zeros there. No branch: one code path for the pipelined loop.
    real = expert < E
    this = e_offs == expert
    group_end = tl.where(real, tl.sum(tl.where(this, ends, 0), 0), M)
    first_row = tl.where(
        real,
        tl.sum(tl.where(this, starts + (tile - tile_ends + tiles) * BLOCK_M, 0), 0),
        tl.max(ends, 0) + (tile - tl.max(tile_ends, 0)) * BLOCK_M,
    )
    rows = first_row + tl.arange(0, BLOCK_M)
    row_ok = rows < group_end
    rows64 = rows.to(tl.int64)
    col_ok = cols < N
    w_base = w_ptr + tl.minimum(expert, E - 1).to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.where(real, K, 0), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            x_ptr + rows64[:, None] * stride_xm + ks[None, :] * stride_xk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    tl.store(
        y_ptr + rows64[:, None] * stride_ym + cols[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _weight_grad_kernel(
    dy_ptr,  # (M, N)
    x_ptr,  # (M, K)
    dw_ptr,  # (E, N, K) out, contiguous
    ends_ptr,  # (E,) int
    M,
    N,
    K,
    stride_dym,
    stride_dyn,
    stride_xm,
    stride_xk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_k = tl.cdiv(K, BLOCK_K)
    expert = pid // (num_n * num_k)
    cols_n = (pid // num_k % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = (pid % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = cols_n < N
    k_ok = cols_k < K
    start = tl.minimum(tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int32), M)
    end = tl.minimum(tl.load(ends_ptr + expert).to(tl.int32), M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        rows64 = rows.to(tl.int64)
        dy_t = tl.load(
            dy_ptr + rows64[None, :] * stride_dym + cols_n[:, None] * stride_dyn,
            mask=row_ok[None, :] & n_ok[:, None],
            other=0.0,
        )
        xs = tl.load(
            x_ptr + rows64[:, None] * stride_xm + cols_k[None, :] * stride_xk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if IEEE:
            acc = tl.dot(dy_t, xs, acc, input_precision="ieee")
        else:
            acc = tl.dot(dy_t, xs, acc)
    out_ptr = dw_ptr + expert.to(tl.int64) * N * K + cols_n[:, None] * K + cols_k[None, :]
    tl.store(out_ptr, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def grouped_mm_forward(
    x_MK: torch.Tensor, w_ENK: torch.Tensor, ends_E: torch.Tensor, tiles: Tiles | None = None
) -> torch.Tensor:
    """y (M, N), y[r] = x[r] @ w[e].T for the rows of group e, zero past the last group; any strides."""
    m, k = x_MK.shape
    num_experts, n, _ = w_ENK.shape
    if k == 0:
        return x_MK.new_zeros(m, n)
    y = x_MK.new_empty(m, n)
    t = tiles or default_config(x_MK).product
    grid = ((triton.cdiv(m, t.block_m) + num_experts) * triton.cdiv(n, t.block_n),)
    if m and n:
        _grouped_mm_kernel[grid](
            x_MK,
            w_ENK,
            y,
            ends_E,
            m,
            n,
            k,
            *x_MK.stride(),
            *w_ENK.stride(),
            *y.stride(),
            E=num_experts,
            BLOCK_E=triton.next_power_of_2(num_experts),
            **t.launch_args(x_MK.dtype),
        )
    return y


def grouped_mm_weight_grad(
    dy_MN: torch.Tensor, x_MK: torch.Tensor, ends_E: torch.Tensor, tiles: Tiles | None = None
) -> torch.Tensor:
    """d(w) (E, N, K) in dy's dtype, d(w)[e] = dy_e.T @ x_e over the rows of group e (zero for an empty group)."""
    m, n = dy_MN.shape
    k = x_MK.shape[1]
    num_experts = ends_E.shape[0]
    dw = dy_MN.new_empty(num_experts, n, k)
    t = tiles or default_config(x_MK).weight_grad
    if dw.numel():
        grid = (num_experts * triton.cdiv(n, t.block_n) * triton.cdiv(k, t.block_k),)
        _weight_grad_kernel[grid](
            dy_MN,
            x_MK,
            dw,
            ends_E,
            m,
            n,
            k,
            *dy_MN.stride(),
            *x_MK.stride(),
            **t.launch_args(x_MK.dtype),
        )
    return dw


@torch.library.custom_op("composer_dlm::grouped_mm", mutates_args=())
def grouped_mm(x_MK: torch.Tensor, w_ENK: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_mm_forward` as a differentiable custom op (one graph node under ``torch.compile``)."""
    return grouped_mm_forward(x_MK, w_ENK, ends_E)


@grouped_mm.register_fake
def _grouped_mm_fake(x_MK: torch.Tensor, w_ENK: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    return x_MK.new_empty(x_MK.shape[0], w_ENK.shape[1])


@torch.library.custom_op("composer_dlm::grouped_mm_weight_grad", mutates_args=())
def weight_grad(dy_MN: torch.Tensor, x_MK: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_mm_weight_grad` as a custom op."""
    return grouped_mm_weight_grad(dy_MN, x_MK, ends_E)


@weight_grad.register_fake
def _weight_grad_fake(dy_MN: torch.Tensor, x_MK: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    return dy_MN.new_empty(ends_E.shape[0], dy_MN.shape[1], x_MK.shape[1])


def _setup_context(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
) -> None:
    x_MK, w_ENK, ends_E = inputs
    ctx.save_for_backward(x_MK, w_ENK, ends_E)


def _backward(
    ctx: torch.autograd.function.FunctionCtx, dy_MN: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    x_MK, w_ENK, ends_E = ctx.saved_tensors  # type: ignore[attr-defined]
    need_dx, need_dw = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
    dx = grouped_mm(dy_MN, w_ENK.transpose(1, 2), ends_E) if need_dx else None
    dw = weight_grad(dy_MN, x_MK, ends_E) if need_dw else None
    return dx, dw, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)
