"""Fused masked linear cross-entropy: loss = sum_i w_i * CE(h_i @ W.T, t_i), gradients formed in the forward.

Shapes: hidden h (N, H), weight W (V, H), targets t (N,), row weights w (N,). Only the M rows with w != 0
(the masked tokens of a diffusion LM) do any matrix work, and no (N, V) or (M, V) tensor ever exists.

Design. The loss is the final scalar of the step, so its gradients can be formed during the forward and
only scaled by grad_output in the backward: that costs the three unavoidable products (6·M·V·H FLOPs)
instead of the 8·M·V·H of recomputing the logits. The weighted rows are compacted (which needs their
count on the host: one synchronisation per call, to size the cuBLAS products; the GPU then waits for
the host to launch the next kernels: all idle gaps of a profiled 36.8 ms step together were 1.3 ms) and
walked in chunks of C rows. Per chunk:

1. cuBLAS: Z = h_C @ W.T into one reused (C, V) buffer in the compute dtype (bf16 under autocast);
2. Triton, one program per row: pass 1 streams the row once for an online max / sum-exp, the argmax and
   the target logit (lse, CE, correctness); pass 2 overwrites Z in place with G0 = w * softmax(Z), whose
   target entry is set to 0; the target coefficient g_t = w * (p_t - 1) is kept in float32;
3. cuBLAS: dh_C = G0 @ W (float32 output where torch has `out_dtype`, else bf16); then one Triton pass adds
   g_t * W[t] in float32 and writes the rows of d(hidden) with one rounding;
4. cuBLAS: dW += G0.T @ h_C, accumulated in place (beta = 1, float32 inside each product).

After the last chunk two Triton kernels add the target terms dW[t] += sum_i g_t,i * h_i in float32, over
the rows sorted by target and cut into segments, parallel over rows and deterministic (no atomics; see
kernels.masked_ce_triton), so SFT batches whose EOS padding puts most rows on one target cost no more. Keeping the target entries out of the bf16
matrices matters: they dominate both gradients, and rounding them once more to bf16 on top of the final
rounding would put the gradients at ~2.3e-3 relative error instead of ~1.7e-3. d(weight) accumulates
in float32 when the weight is float32 (a master parameter under autocast: the gradient buffer itself is
float32, so this costs no memory). For a bf16 weight (FSDP's gathered bf16 parameter) the running sum
between chunks is bf16 (each product accumulates in float32, and the dominant target terms are added in
float32), because a float32 copy of dW (4·V·H bytes, 1.9 GiB at V=126464, H=4096) would break the memory
budget; KernelConfig(fp32_weight_grad=True) pays it for an exact float32 sum. The backward multiplies the
saved gradients by grad_output in place (skipped on the device when it is exactly 1), so it may run only
once (no retain_graph double backward).

Cost, with b = bytes of the compute dtype, a = bytes of the dW accumulator, k = ceil(M / C) chunks:
    FLOPs  6·M·V·H (three GEMMs) + ~12·M·V (exp, max, compare) + 4·M·H (target terms)
    bytes  logits written by the first GEMM and read by the other two: 3·M·V·b; the row kernel: 3·M·V·b
           (two reads, one write); W read by two GEMMs per chunk: 2·k·V·H·b; the dW accumulator read and
           written per chunk: 2·k·V·H·a; plus O(M·H) for gathers and the target terms.
At B·L = 16384, half weighted (M = 8192), H = 4096, V = 126464, bf16: 2.55e13 FLOPs (32 ms at 790 TFLOP/s), and
6.2 + 6.2 GB for the logits and the row kernel, of which only the row kernel (~1.5 ms at 4.3 TB/s) is not under
the compute-bound GEMMs, plus the accumulator's 2·V·H·b = 2.1 GB per chunk, read and written by the epilogue of
a d(weight) product whose contracted dimension is only C: 0.5 ms per chunk where it does not overlap. Measured on
one H200 (torch 2.11, 2026-12-01) at C = 1024 (k = 8): a profiled step is 36.4 ms of kernels (GEMMs 33.8 ms; row
kernel 1.8 ms; target terms 0.2 ms; the rest 0.6 ms), the timed median 41.5 ms, the same with 90% of the rows on
one target and on the forced torch-2.7 branch; Liger-Kernel, the same three products in chunks of 512 rows here
(its formula: the next power of two of M / ceil(V / H)), 44.6 ms. Timed back to back, the GPU runs at its
power cap (SM clock ~1.5 GHz, not 1.98): a lone logits product then runs at ~680-700 TFLOP/s, so the three
products alone take ~36-37 ms (README, "The power cap"). C is a multiple of 1024 where the budget
allows: C = 1024 beat C = 1408 and 1664 (the d(hidden) product's C·H output then fills 1.3 and 1.6 waves of
128 x 256 tiles on 132 SMs, where 1024 and 2048 fill 0.97 and 1.94); the default budget, chunk_bytes = 512 MiB, gives C = 2048 (k = 4: half the accumulator passes
and launches of C = 1024). Transient memory is the (C, V) buffer (494 MiB at C = 2048) plus O(C·H). One
exception: a float32 weight (master) on a torch without matmul ``out_dtype`` (the pinned 2.7) sums each chunk's
bf16 d(weight) product into float32 in a pass of its own (read 4 + 2, write 4 bytes per V·H entry), so there the
budget is ``separate_sum_budget_factor`` (2) times larger: at the shape above 2 chunks of 4096 rows, 2 such
passes, for 1 GiB of buffer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch

from kernels.masked_ce_reference import masked_linear_cross_entropy_reference

FORCE_TORCH27_ENV = "COMPOSER_DLM_FORCE_TORCH27"
"""Set to 1 to take the branches the pinned torch 2.7 takes (no matmul ``out_dtype``) on a newer torch: how
the GPU suite and the benchmarks measure the stack users install, on a machine that runs a newer torch."""


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch settings. Tests use tiny blocks and chunks so the interpreter covers every loop."""

    block_v: int = 4096  # vocabulary tile of the per-row softmax kernel
    block_h: int = 256  # hidden tile of the target-term kernels
    row_block_h: int = 2048  # hidden tile of the d(hidden) row writer (few, wide programs: a cheap pass)
    segment_rows: int = 32  # sorted rows per program of the target-term pass (its parallelism over rows)
    num_warps: int = 16
    chunk_bytes: int = 512 << 20  # budget of the reused (C, V) logits buffer
    max_chunk_rows: int | None = None  # optional cap on C
    chunk_align: int = 1024  # C is a multiple of this when the budget allows (whole tile waves in the GEMMs)
    dh_split: int = 1  # split-K of the d(hidden) product over the vocabulary (batched GEMM), when V divides
    # Sum d(weight) over the chunks in float32 even for a bf16 weight: exact, but 4·V·H transient bytes.
    fp32_weight_grad: bool = False
    # Where that float32 sum of low-precision products is a pass of its own per chunk (torch without matmul
    # out_dtype, e.g. the pinned 2.7, with an fp32 master weight): the buffer budget times this, so fewer,
    # larger chunks make fewer passes over the 4·V·H-byte sum (each ~1.4 ms at V 126464, H 4096 on an H200).
    separate_sum_budget_factor: int = 2


DEFAULT_CONFIG = KernelConfig()


def forced_torch27() -> bool:
    """Whether COMPOSER_DLM_FORCE_TORCH27=1 asks for the pinned torch's branches (read here only)."""
    return os.environ.get(FORCE_TORCH27_ENV, "0") not in ("", "0")


def _has_out_dtype(device_type: str) -> bool:
    """Whether torch.mm / addmm take out_dtype=float32 for bf16/fp16 operands here (CUDA, torch >= 2.8),
    including addmm accumulating into its own fp32 input, and bmm; False when the torch-2.7 branch is forced."""
    return not forced_torch27() and _probe_out_dtype(device_type)


@functools.cache
def _probe_out_dtype(device_type: str) -> bool:
    if device_type != "cuda":
        return False
    try:
        a = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(32, 48, device="cuda", dtype=torch.bfloat16)
        exact = a.float() @ b.float()
        acc = torch.ones(64, 48, device="cuda")
        # The pinned torch's stubs lack out_dtype (torch >= 2.8 has it): hence the ignores here and below.
        prod = torch.mm(a, b, out_dtype=torch.float32)  # type: ignore[call-arg]
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # type: ignore[call-overload]
        batched = torch.bmm(a[None], b[None], out_dtype=torch.float32)[0]  # type: ignore[call-arg]
        ok = prod.dtype == torch.float32 and torch.allclose(prod, exact, rtol=1e-5, atol=1e-4)
        ok = ok and batched.dtype == torch.float32 and torch.allclose(batched, exact, rtol=1e-5, atol=1e-4)
        return bool(ok and torch.allclose(acc, exact + 1, rtol=1e-5, atol=1e-4))
    except (TypeError, RuntimeError):
        return False


def _mm_wide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated in float32 by the GEMM, returned in float32 where it can write float32 (out_dtype, or
    float32 operands), else in the operands' dtype (one rounding; its reader widens it)."""
    if a.dtype != torch.float32 and _has_out_dtype(a.device.type):
        return torch.mm(a, b, out_dtype=torch.float32)  # type: ignore[call-arg]
    return torch.mm(a, b)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc (+)= a @ b in place; acc is in the operands' dtype or float32."""
    if acc.dtype == a.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif _has_out_dtype(a.device.type):
        torch.addmm(acc, a, b, beta=0.0 if first else 1.0, out_dtype=torch.float32, out=acc)  # type: ignore[call-overload]
    else:  # older torch: float32 sum of low-precision partial products, in row slices to bound memory; the
        # low-precision slice is added as it is (converted inside the add, no float32 copy of it)
        step = max(1, (64 << 20) // max(1, b.shape[1] * a.element_size()))
        for s in range(0, a.shape[0], step):
            part = torch.mm(a[s : s + step], b)
            if first:
                acc[s : s + step].copy_(part)
            else:
                acc[s : s + step].add_(part)


def _chunk_rows(num_rows: int, vocab: int, elt: int, cfg: KernelConfig, budget_factor: int = 1) -> int:
    """Rows per chunk: within the buffer budget (times ``budget_factor``), aligned, balanced over the chunks."""
    cap = max(1, cfg.chunk_bytes * budget_factor // (vocab * elt))
    if cfg.max_chunk_rows is not None:
        cap = min(cap, cfg.max_chunk_rows)
    if cap >= cfg.chunk_align:
        cap = cap // cfg.chunk_align * cfg.chunk_align
    num_chunks = math.ceil(num_rows / cap)
    rows = math.ceil(num_rows / num_chunks)
    if rows >= 128:
        rows = min(cap, math.ceil(rows / 128) * 128)
    return rows


def _dh_product(z: torch.Tensor, w: torch.Tensor, split: int) -> torch.Tensor:
    """z (C, V) @ w (V, H) as :func:`_mm_wide` returns it; with split > 1, as `split` batched products over
    vocabulary slices summed in float32 (more output tiles for the GEMM when C * H is too small to fill the
    GPU)."""
    rows, vocab = z.shape
    if split == 1 or vocab % split:
        return _mm_wide(z, w)
    a = z.view(rows, split, vocab // split).transpose(0, 1)
    b = w.view(split, vocab // split, w.shape[1])
    if z.dtype != torch.float32 and _has_out_dtype(z.device.type):
        return torch.bmm(a, b, out_dtype=torch.float32).sum(0)  # type: ignore[call-arg]
    return torch.bmm(a, b).float().sum(0)


def _forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_weight: torch.Tensor,
    compute_dtype: torch.dtype,
    need_dh: bool,
    need_dw: bool,
    cfg: KernelConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss, per-row CE and correctness, and (when asked) both gradients for grad_output = 1."""
    num_rows, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    hidden_c = hidden.to(compute_dtype).contiguous()
    weight_c = weight.to(compute_dtype).contiguous()
    targets = targets.long().contiguous()
    row_weight = row_weight.float().contiguous()

    rows_M = torch.nonzero(row_weight).squeeze(1)  # host sync: the GEMMs need the count
    num_w = rows_M.numel()
    ce_N = torch.zeros(num_rows, dtype=torch.float32, device=device)
    correct_N = torch.zeros(num_rows, dtype=torch.bool, device=device)
    d_hidden = torch.zeros(num_rows, dim, dtype=hidden.dtype, device=device) if need_dh else None
    if num_w == 0:
        d_weight = torch.zeros(vocab, dim, dtype=weight.dtype, device=device) if need_dw else None
        return torch.zeros((), dtype=torch.float32, device=device), ce_N, correct_N, d_hidden, d_weight
    d_weight = None
    if need_dw:
        # Accumulate in the weight's own dtype when it is float32 or the compute dtype, else in float32.
        own = weight.dtype in (compute_dtype, torch.float32) and not cfg.fp32_weight_grad
        acc_dtype = weight.dtype if own else torch.float32
        d_weight = torch.empty(vocab, dim, dtype=acc_dtype, device=device)

    need_grad = need_dh or need_dw
    from kernels import masked_ce_triton as tk  # on first use: `import kernels` works without Triton

    targets_M = targets.index_select(0, rows_M)
    weights_M = row_weight.index_select(0, rows_M)
    ce_M = torch.empty(num_w, dtype=torch.float32, device=device)
    correct_M = torch.empty(num_w, dtype=torch.int8, device=device)
    gt_M = torch.empty(num_w, dtype=torch.float32, device=device)
    separate_sum = (
        d_weight is not None and d_weight.dtype != compute_dtype and not _has_out_dtype(device.type)
    )  # _accumulate's last branch
    factor = cfg.separate_sum_budget_factor if separate_sum else 1
    chunk = _chunk_rows(num_w, vocab, weight_c.element_size(), cfg, factor)
    buf = torch.empty(chunk, vocab, dtype=compute_dtype, device=device)
    for start in range(0, num_w, chunk):
        stop = min(start + chunk, num_w)
        rows_C = rows_M[start:stop]
        hidden_CH = hidden_c.index_select(0, rows_C)
        z_CV = buf[: stop - start]
        torch.mm(hidden_CH, weight_c.t(), out=z_CV)
        tk.softmax_grad_rows(
            z_CV,
            targets_M[start:stop],
            weights_M[start:stop],
            ce_M[start:stop],
            correct_M[start:stop],
            gt_M[start:stop],
            write_grad=need_grad,
            block_v=cfg.block_v,
            num_warps=cfg.num_warps,
        )
        if d_hidden is not None:
            tk.write_d_hidden_rows(
                d_hidden,
                rows_C,
                _dh_product(z_CV, weight_c, cfg.dh_split),
                gt_M[start:stop],
                weight_c,
                targets_M[start:stop],
                block_h=cfg.row_block_h,
            )
        if d_weight is not None:
            _accumulate(d_weight, z_CV.t(), hidden_CH, first=start == 0)
    del buf
    if d_weight is not None:
        # The sort returns the sorted targets with their order (no separate gather); indexing a 1-D
        # tensor yields new contiguous ones.
        sorted_t, order = torch.sort(targets_M, stable=True)
        tk.add_target_terms(
            d_weight,
            hidden_c,
            sorted_t,
            rows_M[order],
            gt_M[order],
            segment_rows=cfg.segment_rows,
            block_h=cfg.block_h,
        )
        d_weight = d_weight.to(weight.dtype)
    ce_N.index_copy_(0, rows_M, ce_M)
    correct_N.index_copy_(0, rows_M, correct_M.view(torch.bool))  # 0 / 1 bytes: a view, not a copy
    loss = torch.dot(weights_M, ce_M)
    return loss, ce_N, correct_N, d_hidden, d_weight


class _MaskedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        row_weight: torch.Tensor,
        compute_dtype: torch.dtype,
        cfg: KernelConfig,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need_dh, need_dw = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        with torch.autocast(hidden.device.type, enabled=False):
            loss, ce, correct, d_hidden, d_weight = _forward(
                hidden, weight, targets, row_weight, compute_dtype, need_dh, need_dw, cfg
            )
        # save_for_backward accepts None (documented), though torch annotates its arguments as Tensor.
        ctx.save_for_backward(d_hidden, d_weight)  # type: ignore[arg-type]
        ctx.mark_non_differentiable(ce, correct)
        ctx.used = False  # type: ignore[attr-defined]
        return loss, ce, correct

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor, *_: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:  # type: ignore[attr-defined]
            raise RuntimeError("masked_linear_cross_entropy: backward may run only once (no retain_graph)")
        ctx.used = True  # type: ignore[attr-defined]
        d_hidden, d_weight = ctx.saved_tensors  # type: ignore[attr-defined]
        g = grad_loss.detach().contiguous()
        from kernels import masked_ce_triton as tk

        for grad in (d_hidden, d_weight):
            if grad is not None:
                tk.scale_(grad, g)
        return d_hidden, d_weight, None, None, None, None


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports here (torch wheels for some platforms ship without it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(t: torch.Tensor) -> bool:
    on_device = t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return on_device and triton_available()


@torch.compiler.disable
def masked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_weight: torch.Tensor,
    *,
    return_stats: bool = False,
    config: KernelConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum_i row_weight_i * CE(hidden_i @ weight.T, targets_i) as a float32 scalar.

    hidden (N, H), weight (V, H), targets (N,) int (valid ids wherever the weight is nonzero, anything
    elsewhere), row_weight (N,) float. Under autocast both operands are cast to the autocast dtype, as
    F.linear would be; otherwise they must share a dtype. Runs the Triton path on CUDA (or on CPU when
    TRITON_INTERPRET=1) where Triton is installed, and the plain-PyTorch reference otherwise. With `return_stats`, also returns,
    without gradient, per-row CE (float32, (N,)) and argmax == target (bool, (N,)), both zero where the
    weight is 0.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need hidden (N, H) and weight (V, H); got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if targets.shape != (hidden.shape[0],) or row_weight.shape != (hidden.shape[0],):
        raise ValueError(
            f"targets and row_weight must be ({hidden.shape[0]},); got {tuple(targets.shape)}, {tuple(row_weight.shape)}"
        )
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    elif hidden.dtype == weight.dtype:
        compute_dtype = hidden.dtype
    else:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype} (outside autocast)")
    if not _use_triton(hidden):
        return masked_linear_cross_entropy_reference(
            hidden, weight, targets, row_weight, return_stats=return_stats
        )
    loss, ce, correct = _MaskedLinearCE.apply(
        hidden, weight, targets, row_weight, compute_dtype, config or DEFAULT_CONFIG
    )
    if return_stats:
        return loss, ce, correct
    return loss
