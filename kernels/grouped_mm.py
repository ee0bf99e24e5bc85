"""Grouped matrix product for mixture-of-experts layers: rows sorted by expert, one weight per group.

``grouped_mm(x_MK, w_ENK, ends_E)`` returns y (M, N) with y[r] = x[r] @ w[e].T for the rows r in
[ends[e-1], ends[e]) (ends[-1] = 0 before the first group); rows at or past ends[E-1] are left as they come
out (the callers' padding rows, which nobody reads). ``w`` has ``nn.Linear``'s layout per expert (out, in).

Where torch has ``torch._grouped_mm`` (torch >= 2.8; one CUTLASS kernel over every group, with its backward, on
CUDA in bf16) that is used: the group sizes stay on the device and nothing waits for the host. Elsewhere
(torch 2.7, the CPU, fp32) :func:`grouped_mm_reference` runs one product per expert, which reads the group
sizes on the host; it is the reference the tests compare with, and the path of CPU runs.
"""

from __future__ import annotations

import os

import torch

# COMPOSER_DLM_FORCE_TORCH27=1 takes the pinned torch's branch on a newer torch (the same switch as kernels.masked_ce).
_FORCE_TORCH27_ENV = "COMPOSER_DLM_FORCE_TORCH27"

# Rows per group are padded to a multiple of this by the callers, the alignment torch's grouped GEMM wants.
GROUP_ALIGN = 16


def has_grouped_mm(x: torch.Tensor) -> bool:
    """Whether :func:`grouped_mm` on ``x`` runs torch's single grouped kernel (CUDA, bf16, torch >= 2.8)."""
    forced = os.environ.get(_FORCE_TORCH27_ENV, "0") not in ("", "0")
    return hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16 and not forced


def grouped_mm(x_MK: torch.Tensor, w_ENK: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """y[r] = x[r] @ w[e].T for the rows of group e (see the module docstring); differentiable."""
    if has_grouped_mm(x_MK):
        ends = ends_E.to(torch.int32)
        return torch._grouped_mm(x_MK, w_ENK.transpose(-2, -1), offs=ends)  # type: ignore[attr-defined]
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
