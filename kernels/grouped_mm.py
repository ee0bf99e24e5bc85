"""Grouped matrix product for mixture-of-experts layers: rows sorted by expert, one weight per group.

``grouped_mm(x_MK, w_ENK, ends_E)`` returns y (M, N) with y[r] = x[r] @ w[e].T for the rows r in
[ends[e-1], ends[e]) (ends[-1] = 0 before the first group); rows at or past ends[E-1] are the callers' padding,
which nobody reads (zero on the Triton and reference paths). ``w`` has ``nn.Linear``'s layout per expert
(out, in); ``ends`` is a non-decreasing integer tensor on x's device with ends[E-1] <= M.

Three paths, none with a Python loop over experts on CUDA:

- torch >= 2.8, CUDA, bf16: ``torch._grouped_mm`` (one CUTLASS kernel over every group, with its backward);
- CUDA otherwise (the pinned torch 2.7, float32 / float16, or COMPOSER_DLM_FORCE_TORCH27=1 on a newer torch):
  the Triton grouped GEMM of :mod:`kernels.grouped_mm_triton`, forward and backward, a custom op that
  ``torch.compile`` keeps in its graph;
- elsewhere (the CPU, or CUDA without Triton): :func:`grouped_mm_reference`, one product per expert.

The group sizes stay on the device on both CUDA paths: nothing waits for the host. The reference reads them on
the host; it is what the tests compare with, and the path of CPU runs.
"""

from __future__ import annotations

import torch

from kernels.masked_ce import forced_torch27, triton_available

# Rows per group are padded to a multiple of this by the callers, the alignment torch's grouped GEMM wants.
GROUP_ALIGN = 16

_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def has_grouped_mm(x: torch.Tensor) -> bool:
    """Whether :func:`grouped_mm` on ``x`` runs torch's single grouped kernel (CUDA, bf16, torch >= 2.8)."""
    return hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16 and not forced_torch27()


def grouped_mm(x_MK: torch.Tensor, w_ENK: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """y[r] = x[r] @ w[e].T for the rows of group e (see the module docstring); differentiable."""
    if (
        x_MK.dim() != 2
        or w_ENK.dim() != 3
        or ends_E.shape != (w_ENK.shape[0],)
        or x_MK.shape[1] != w_ENK.shape[2]
    ):
        raise ValueError(
            f"grouped_mm needs x (M, K), w (E, N, K), ends (E,); got {tuple(x_MK.shape)}, {tuple(w_ENK.shape)}, "
            f"{tuple(ends_E.shape)}"
        )
    if x_MK.dtype != w_ENK.dtype:
        raise ValueError(
            f"grouped_mm: x is {x_MK.dtype} but w is {w_ENK.dtype}; cast both to the compute dtype"
        )
    if has_grouped_mm(x_MK):
        ends = ends_E.to(torch.int32)
        return torch._grouped_mm(x_MK, w_ENK.transpose(-2, -1), offs=ends)  # type: ignore[attr-defined]
    if x_MK.is_cuda and x_MK.dtype in _TRITON_DTYPES and triton_available():
        from kernels import grouped_mm_triton  # on first use: `import kernels` works without Triton

        return grouped_mm_triton.grouped_mm(x_MK, w_ENK, ends_E)
    return grouped_mm_reference(x_MK, w_ENK, ends_E)


def grouped_mm_reference(x_MK: torch.Tensor, w_ENK: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_mm` as one product per group (group sizes read on the host); rows past the last group
    are zero."""
    out = x_MK.new_zeros(x_MK.shape[0], w_ENK.shape[1])
    start = 0
    for e, end in enumerate(ends_E.tolist()):
        if end > start:
            out[start:end] = x_MK[start:end] @ w_ENK[e].T
        start = end
    return out
