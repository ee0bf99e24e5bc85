"""Plain-PyTorch reference of the fused masked linear cross-entropy.

    loss = sum_i row_weight_i * CE(hidden_i @ weight.T, targets_i)

Same contract as `kernels.masked_linear_cross_entropy`; used on CPU without the Triton interpreter, and
by tests and benchmarks as the fast twin of their float64 oracle. Only rows with a nonzero weight are
computed, in chunks of `chunk_rows`; each chunk runs under non-reentrant activation checkpointing, so its
logits are rebuilt in the backward instead of being stored (no (N, V) tensor is kept). Casting follows
autocast: `F.linear` casts hidden and weight to the autocast dtype when autocast is on, and the
log-sum-exp is taken in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(
    hidden_CH: torch.Tensor, weight_VH: torch.Tensor, targets_C: torch.Tensor, row_weight_C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted CE sum of one chunk of rows, plus the per-row CE and argmax == target (no gradient)."""
    logits_CV = F.linear(hidden_CH, weight_VH).float()
    lse_C = torch.logsumexp(logits_CV, dim=-1)
    ce_C = lse_C - logits_CV.gather(1, targets_C[:, None]).squeeze(1)
    correct_C = logits_CV.argmax(dim=-1) == targets_C
    return (row_weight_C * ce_C).sum(), ce_C.detach(), correct_C


def masked_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_weight: torch.Tensor,
    *,
    return_stats: bool = False,
    chunk_rows: int = 1024,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum_i row_weight_i * CE(hidden_i @ weight.T, targets_i), in plain PyTorch.

    hidden (N, H), weight (V, H), targets (N,) int, row_weight (N,) float. With `return_stats`, also
    returns per-row CE (float32, (N,)) and argmax == target (bool, (N,)), both zero where the weight is 0.
    """
    num_rows = hidden.shape[0]
    rows_M = torch.nonzero(row_weight).squeeze(1)
    row_weight_f = row_weight.float()
    targets = targets.long()
    ce_N = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
    correct_N = torch.zeros(num_rows, dtype=torch.bool, device=hidden.device)
    if rows_M.numel() == 0:
        # An empty product keeps the graph connected, so both gradients come back as zeros.
        loss = F.linear(hidden[:0], weight).float().sum()
    else:
        loss = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, rows_M.numel(), chunk_rows):
            rows_C = rows_M[start : start + chunk_rows]
            part, ce_C, correct_C = checkpoint(
                _chunk_loss,
                hidden.index_select(0, rows_C),
                weight,
                targets.index_select(0, rows_C),
                row_weight_f.index_select(0, rows_C),
                use_reentrant=False,
            )
            loss = loss + part
            ce_N.index_copy_(0, rows_C, ce_C)
            correct_N.index_copy_(0, rows_C, correct_C)
    if return_stats:
        return loss, ce_N, correct_N
    return loss
