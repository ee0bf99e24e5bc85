"""The Triton kernels of the fused masked cross-entropy (:mod:`kernels.masked_ce`) and their launchers.

Imported only when the Triton path runs (CUDA, or CPU under TRITON_INTERPRET=1), so that `import kernels`
works where torch ships without Triton.

Target terms, dW[t] += sum over weighted rows i with target t of g_t,i * h_i (float32 sums), are computed
from the rows sorted by target, cut into segments of S consecutive sorted rows, in two passes that are
parallel over rows and deterministic (no atomics, a fixed summation order):

1. one program per (segment, hidden tile) walks its S rows, summing each run of equal targets. A run that
   starts and ends inside the segment is added to dW[t] at once (no other program touches that row). The
   segment's first run, if it began in an earlier segment, is stored as the segment's head partial; its
   last run, if it began here and goes on into the next segment, as its tail partial.
2. one program per (segment, hidden tile) whose tail partial exists (it owns a run spanning segments) adds
   the head partials of the following segments that continue the run (a tile of them at a time) and
   writes dW[t] once.

So SFT-shaped inputs (90% of the weighted rows on the EOS target) cost what uniform targets cost, where
one program per target walked the whole run before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)  # globals used in kernels must be constexpr


@triton.jit
def _softmax_grad_rows_kernel(
    z_ptr,  # (C, V) logits in the compute dtype; overwritten with G0 when WRITE_GRAD
    stride_z,
    targets_ptr,  # (C,) int64
    weights_ptr,  # (C,) float32
    ce_ptr,  # (C,) float32 out: lse - z_t
    correct_ptr,  # (C,) int8 out: argmax == t
    gt_ptr,  # (C,) float32 out: w * (p_t - 1)
    V,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride_z
    t = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    # Per-lane online max / sum-exp / first argmax, reduced across lanes after the loop.
    m_vec = tl.full([BLOCK_V], -1.0e30, tl.float32)
    s_vec = tl.zeros([BLOCK_V], tl.float32)
    i_vec = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        z = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        i_vec = tl.where(z > m_vec, offs, i_vec)
        m_new = tl.maximum(m_vec, z)
        s_vec = s_vec * tl.exp2((m_vec - m_new) * _LOG2E) + tl.exp2((z - m_new) * _LOG2E)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    s = tl.sum(s_vec * tl.exp2((m_vec - m) * _LOG2E), axis=0)
    lse = m + tl.log2(s) / _LOG2E
    argmax = tl.min(tl.where(m_vec == m, i_vec, 2147483647), axis=0)
    z_t = tl.load(base + t).to(tl.float32)
    tl.store(ce_ptr + row, lse - z_t)
    tl.store(correct_ptr + row, (argmax == t).to(tl.int8))
    if WRITE_GRAD:
        w = tl.load(weights_ptr + row)
        tl.store(gt_ptr + row, w * (tl.exp2((z_t - lse) * _LOG2E) - 1.0))
        # Backwards over the row: its last tiles, read last by the first pass, are the likeliest still in L2.
        last = tl.cdiv(V, BLOCK_V) - 1
        for i in range(0, last + 1):
            offs = (last - i) * BLOCK_V + cols
            mask = offs < V
            z = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.where(offs == t, 0.0, w * tl.exp2((z - lse) * _LOG2E))
            tl.store(base + offs, g.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _d_hidden_rows_kernel(
    out_ptr,  # (N, H) d(hidden), rows written in place
    stride_out,
    rows_ptr,  # (C,) int64 the chunk's rows of d(hidden)
    dh_ptr,  # (C, H) G0 @ W, float32 or the compute dtype
    stride_dh,
    gt_ptr,  # (C,) float32 target coefficients
    w_ptr,  # (V, H) weight in the compute dtype
    stride_w,
    targets_ptr,  # (C,) int64
    H,
    BLOCK_H: tl.constexpr,
):
    """out[rows[c]] = dh[c] + g_t[c] * W[t[c]], summed in float32 and rounded once to out's dtype."""
    c = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    t = tl.load(targets_ptr + c)
    g = tl.load(gt_ptr + c)
    dh = tl.load(dh_ptr + c * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    w_t = tl.load(w_ptr + t * stride_w + cols, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + tl.load(rows_ptr + c) * stride_out + cols
    tl.store(dst, (dh + g * w_t).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _flush_run(dw_ptr, stride_dw, part_ptr, t, acc, cols, cmask, to_part):
    """A run's sum goes to its partial slot (`to_part`) or is added to dW[t] (sole writer of that row)."""
    if to_part:
        tl.store(part_ptr + cols, acc, mask=cmask)
    else:
        dst = dw_ptr + t * stride_dw + cols
        old = tl.load(dst, mask=cmask, other=0.0).to(tl.float32)
        tl.store(dst, (old + acc).to(dw_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _target_terms_segments_kernel(
    dw_ptr,  # (V, H) d(weight), updated in place
    stride_dw,
    hidden_ptr,  # (N, H) hidden in the compute dtype
    stride_h,
    sorted_t_ptr,  # (M,) int64 targets of the weighted rows, sorted
    sorted_rows_ptr,  # (M,) int64 their row indices into hidden
    sorted_g_ptr,  # (M,) float32 their target coefficients g_t
    head_ptr,  # (num_segments, H) float32 out: the first run's sum where that run began earlier
    tail_ptr,  # (num_segments, H) float32 out: the last run's sum where that run began here and goes on
    M,
    H,
    SEGMENT: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Pass 1: sums of the runs of equal targets within one segment of SEGMENT sorted rows."""
    seg = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    lo = seg * SEGMENT
    hi = tl.minimum(lo + SEGMENT, M)
    before = tl.load(sorted_t_ptr + lo - 1, mask=lo > 0, other=-1)  # target of the previous segment's end
    after = tl.load(sorted_t_ptr + hi, mask=hi < M, other=-1)  # target of the next segment's start
    head = head_ptr + seg.to(tl.int64) * H
    tail = tail_ptr + seg.to(tl.int64) * H
    cur = tl.load(sorted_t_ptr + lo)
    acc = tl.zeros([BLOCK_H], tl.float32)
    for k in range(lo, hi):
        t_k = tl.load(sorted_t_ptr + k)
        if t_k != cur:  # the run of `cur` ended inside the segment; it cannot go on into the next one
            _flush_run(dw_ptr, stride_dw, head, cur, acc, cols, cmask, cur == before)
            acc = tl.zeros([BLOCK_H], tl.float32)
            cur = t_k
        r = tl.load(sorted_rows_ptr + k)
        g = tl.load(sorted_g_ptr + k)
        acc += g * tl.load(hidden_ptr + r * stride_h + cols, mask=cmask, other=0.0).to(tl.float32)
    if cur == before:  # the only run of the segment, begun earlier (it may go on too)
        _flush_run(dw_ptr, stride_dw, head, cur, acc, cols, cmask, True)
    else:
        _flush_run(dw_ptr, stride_dw, tail, cur, acc, cols, cmask, cur == after)


@triton.jit
def _target_terms_spanning_kernel(
    dw_ptr,
    stride_dw,
    sorted_t_ptr,
    head_ptr,
    tail_ptr,
    M,
    H,
    num_segments,
    SEGMENT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Pass 2: a run that began in this segment and goes on gets the head partials of the segments after it
    that continue it (targets are sorted, so those are consecutive), summed BLOCK_S at a time."""
    seg = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    lo = seg * SEGMENT
    hi = tl.minimum(lo + SEGMENT, M)
    last = tl.load(sorted_t_ptr + hi - 1)
    before = tl.load(sorted_t_ptr + lo - 1, mask=lo > 0, other=-1)
    after = tl.load(sorted_t_ptr + hi, mask=hi < M, other=-1)
    if (after == last) & (before != last):
        acc = tl.load(tail_ptr + seg.to(tl.int64) * H + cols, mask=cmask, other=0.0)
        nxt = seg + 1
        going = nxt < num_segments
        while going:
            segs = nxt + tl.arange(0, BLOCK_S)
            starts = tl.load(sorted_t_ptr + segs.to(tl.int64) * SEGMENT, mask=segs < num_segments, other=-1)
            cont = starts == last
            parts = tl.load(
                head_ptr + segs.to(tl.int64)[:, None] * H + cols[None, :],
                mask=cont[:, None] & cmask[None, :],
                other=0.0,
            )
            acc += tl.sum(parts, axis=0)
            going = tl.sum(cont.to(tl.int32), axis=0) == BLOCK_S
            nxt += BLOCK_S
        dst = dw_ptr + last * stride_dw + cols
        old = tl.load(dst, mask=cmask, other=0.0).to(tl.float32)
        tl.store(dst, (old + acc).to(dw_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _scale_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr):
    """x *= g in float32, in place; returns at once when g == 1 (the usual grad_output)."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        tl.store(x_ptr + offs, (x.to(tl.float32) * g).to(x_ptr.dtype.element_ty), mask=mask)


def softmax_grad_rows(
    z_CV: torch.Tensor,
    targets_C: torch.Tensor,
    weights_C: torch.Tensor,
    ce_C: torch.Tensor,
    correct_C: torch.Tensor,
    gt_C: torch.Tensor,
    *,
    write_grad: bool,
    block_v: int,
    num_warps: int,
) -> None:
    """Per row of z: CE, argmax == target, g_t = w (p_t - 1); with `write_grad`, z <- w softmax(z), target 0."""
    rows, vocab = z_CV.shape
    _softmax_grad_rows_kernel[(rows,)](
        z_CV,
        z_CV.stride(0),
        targets_C,
        weights_C,
        ce_C,
        correct_C,
        gt_C,
        vocab,
        WRITE_GRAD=write_grad,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )


def write_d_hidden_rows(
    d_hidden: torch.Tensor,
    rows_C: torch.Tensor,
    dh_CH: torch.Tensor,
    gt_C: torch.Tensor,
    weight: torch.Tensor,
    targets_C: torch.Tensor,
    *,
    block_h: int,
) -> None:
    """d_hidden[rows_C] = dh_CH + gt_C[:, None] * weight[targets_C] in float32, one rounding to d_hidden's
    dtype: the target terms of d(hidden), the row scatter and the cast in one pass (dh_CH may be float32 or
    the compute dtype)."""
    rows, dim = dh_CH.shape
    if rows == 0:
        return
    grid = (rows, triton.cdiv(dim, block_h))
    _d_hidden_rows_kernel[grid](
        d_hidden,
        d_hidden.stride(0),
        rows_C,
        dh_CH,
        dh_CH.stride(0),
        gt_C,
        weight,
        weight.stride(0),
        targets_C,
        dim,
        BLOCK_H=block_h,
        num_warps=max(1, min(8, block_h // 256)),
    )


def add_target_terms(
    d_weight: torch.Tensor,
    hidden: torch.Tensor,
    sorted_t_M: torch.Tensor,
    sorted_rows_M: torch.Tensor,
    sorted_g_M: torch.Tensor,
    *,
    segment_rows: int,
    block_h: int,
) -> None:
    """d_weight[t] += sum over i with sorted_t_M[i] == t of sorted_g_M[i] * hidden[sorted_rows_M[i]], float32
    sums, parallel over rows and deterministic (see the module docstring)."""
    num_w = sorted_t_M.numel()
    dim = hidden.shape[1]
    num_segments = triton.cdiv(num_w, segment_rows)
    parts = torch.empty(2, num_segments, dim, dtype=torch.float32, device=hidden.device)
    grid = (num_segments, triton.cdiv(dim, block_h))
    common = dict(SEGMENT=segment_rows, BLOCK_H=block_h, num_warps=4)
    _target_terms_segments_kernel[grid](
        d_weight,
        d_weight.stride(0),
        hidden,
        hidden.stride(0),
        sorted_t_M,
        sorted_rows_M,
        sorted_g_M,
        parts[0],
        parts[1],
        num_w,
        dim,
        **common,
    )
    _target_terms_spanning_kernel[grid](
        d_weight,
        d_weight.stride(0),
        sorted_t_M,
        parts[0],
        parts[1],
        num_w,
        dim,
        num_segments,
        BLOCK_S=16,
        **common,
    )


def scale_(x: torch.Tensor, g: torch.Tensor) -> None:
    """x *= g in place (float32 arithmetic); a no-op on the device when g == 1."""
    n = x.numel()
    if n:
        block = 8192
        _scale_kernel[(triton.cdiv(n, block),)](x, g.reshape(1).float(), n, BLOCK=block)
