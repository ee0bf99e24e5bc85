"""FP8 compute for the trunk's linear layers (``model.fp8: rowwise | tensorwise``); weights stay as they are.

Each of a block's seven projections (LLaDA-MoE: the attention and shared-expert projections; see
:func:`convert_to_fp8`) computes its three products (the output, d(input), d(weight)) with
``torch._scaled_mm`` on e4m3 operands scaled per row (``rowwise``: one scale per row of each operand along the
contracted dimension, the gradient in e4m3 too) or per tensor (``tensorwise``: one scale per operand, the
gradient in e5m2). A scale is the power of two at or above ``amax / fp8_max``, so dividing by it and
multiplying the product back are exact, and a tensor's largest element lands at or under the format's maximum.

Each operand is quantised once per product it enters with a new scale. Tensorwise: a tensor's scale does not
depend on its layout, so the forward's e4m3 copy of the input, transposed, is the d(weight) operand (saved for
the backward instead of the bf16 input: half the bytes), the weight is cast again with its forward scale for
d(input) (no second amax), and the gradient is quantised once for both backward products. Rowwise: the forward
scales along K (per token, per output feature), the backward along M and N, so the backward quantises the
saved bf16 input and weight again. The output product accumulates with ``use_fast_accum`` (as torchao does for
it); the two gradient products accumulate exactly.

FP8 is compute only: the parameters keep their names, shapes and dtypes (fp32 masters or bf16), the module
stays an ``nn.Linear`` (state dicts, checkpoints and Hugging Face exports are unchanged). The output projection
stays in the fused bf16 loss (``kernels/masked_ce``).

The amax, scale and cast of an operand (a transpose too, for the backward's operands) are plain PyTorch: with
``model.compile_blocks`` Inductor fuses them into its own kernels (and its partitioner picks what the backward
keeps); eager, they are separate passes that cost more than FP8 saves. Row counts that are not a multiple of
16 (``_scaled_mm``'s alignment; the 1% of batches cut to a random length) compute in bf16.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from composer_dlm.config import ConfigError, Fp8Recipe
from composer_dlm.models.architectures import AnyModel
from composer_dlm.models.llada_moe import SparseMoE

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ALIGN = 16  # _scaled_mm: every dimension of both operands a multiple of 16
AMAX_FLOOR = 1e-12
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer


def fp8_scale(amax: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """The dequantising scale for ``amax`` (fp32): ``2 ** ceil(log2(amax / fp8_max))``, amax at least
    ``AMAX_FLOOR`` so that all-zero rows (the gradient of tokens the loss does not score) get a normal, non-zero
    scale and stay zero."""
    fp8_max = torch.finfo(fp8_dtype).max
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=AMAX_FLOOR) / fp8_max)))


def cast(t_2d: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """``t_2d / scale`` as ``fp8_dtype``, contiguous (row-major), saturated at the format's maximum."""
    fp8_max = torch.finfo(fp8_dtype).max
    return (t_2d.float() / scale).clamp(-fp8_max, fp8_max).to(fp8_dtype).contiguous()


def quantize(t_2d: torch.Tensor, fp8_dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``t_2d`` (R, C) as ``fp8_dtype`` (contiguous, row-major) and the dequantising scale: (R, 1) fp32 with
    ``rowwise`` (one per row, the amax over C), else a 0-dim fp32 (:func:`fp8_scale`). ``q * scale``
    approximates ``t_2d``."""
    t = t_2d.float()
    amax = t.abs().amax(dim=-1, keepdim=True) if rowwise else t.abs().amax()
    scale = fp8_scale(amax, fp8_dtype)
    return cast(t, scale, fp8_dtype), scale


def _mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    fast_accum: bool = False,
) -> torch.Tensor:
    """``(a * a_scale) @ (b * b_scale).T`` in ``out_dtype`` for quantised ``a`` (M, K) and ``b`` (N, K), both
    row-major: ``b.t()`` is the column-major second operand ``_scaled_mm`` wants, and its per-row scales become
    (1, N). ``fast_accum``: Hopper's FP8 accumulation without the periodic promotion to fp32 (faster, a little
    less exact)."""
    b_scale = b_scale.reshape(1, -1) if b_scale.dim() else b_scale
    return torch._scaled_mm(
        a, b.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype, use_fast_accum=fast_accum
    )


class _Fp8Matmul(torch.autograd.Function):
    """``x_MK @ weight_NK.T`` in bf16 with all three products in FP8 (``x_MK`` bf16, the weight any float)."""

    @staticmethod
    def forward(ctx: Any, x_MK: torch.Tensor, weight_NK: torch.Tensor, rowwise: bool) -> torch.Tensor:
        qx_MK, x_scale = quantize(x_MK, E4M3, rowwise)
        qw_NK, w_scale = quantize(weight_NK, E4M3, rowwise)
        if rowwise:  # the backward scales along other dimensions: it quantises the inputs again
            ctx.save_for_backward(x_MK, weight_NK)
        else:  # one scale per tensor: q(x).T is a quantisation of x.T, and w.T casts with w's scale
            ctx.save_for_backward(qx_MK, x_scale, weight_NK, w_scale)
        ctx.rowwise = rowwise
        return _mm(qx_MK, x_scale, qw_NK, w_scale, fast_accum=True)

    @staticmethod
    def backward(ctx: Any, grad_MN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        if ctx.rowwise:
            grad_x, grad_w = _rowwise_grads(grad_MN, *ctx.saved_tensors)
        else:
            grad_x, grad_w = _tensorwise_grads(grad_MN, *ctx.saved_tensors)
        return grad_x, grad_w, None


def _rowwise_grads(
    grad_MN: torch.Tensor, x_MK: torch.Tensor, weight_NK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """d(input), d(weight) with every operand scaled along the product's contracted dimension (all e4m3: the
    rowwise ``_scaled_mm`` takes e4m3 operands and writes bf16 only)."""
    # d(input) = grad @ weight: grad's rows over N, weight's columns (rows of weight.T) over N
    grad_x = _mm(*quantize(grad_MN, E4M3, True), *quantize(weight_NK.t(), E4M3, True))
    # d(weight) = grad.T @ x: both scaled along the token dimension M
    grad_w = _mm(*quantize(grad_MN.t(), E4M3, True), *quantize(x_MK.t(), E4M3, True))
    return grad_x, grad_w.to(weight_NK.dtype)


def _tensorwise_grads(
    grad_MN: torch.Tensor,
    qx_MK: torch.Tensor,
    x_scale: torch.Tensor,
    weight_NK: torch.Tensor,
    w_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """d(input), d(weight) from the forward's quantised input and weight scale and one e5m2 quantisation of
    the gradient; d(weight) comes out in the weight's dtype (fp32 masters: no bf16 round trip)."""
    qg_MN, g_scale = quantize(grad_MN, E5M2, False)
    grad_x = _mm(qg_MN, g_scale, cast(weight_NK.t(), w_scale, E4M3), w_scale)
    grad_w = _mm(qg_MN.t().contiguous(), g_scale, qx_MK.t().contiguous(), x_scale, out_dtype=weight_NK.dtype)
    return grad_x, grad_w


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` (no bias) whose products run in FP8 (see the module docstring); same parameters. Like
    the bf16 autocast it replaces, it takes the input in bf16 (rowwise saves that copy for the backward,
    tensorwise its e4m3 quantisation) and returns bf16."""

    rowwise: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_MK = x.reshape(-1, x.shape[-1])
        if x_MK.shape[0] % ALIGN:
            return F.linear(x, self.weight)
        out_MN = _Fp8Matmul.apply(x_MK.to(torch.bfloat16), self.weight, self.rowwise)
        return out_MN.view(*x.shape[:-1], -1)


def _fp8_linear(linear: nn.Linear, rowwise: bool) -> Fp8Linear:
    new = Fp8Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    new.weight = linear.weight  # the same Parameter: nothing copied, nothing renamed
    new.rowwise = rowwise
    return new


def convert_to_fp8(model: AnyModel, recipe: Fp8Recipe) -> int:
    """Swaps, in place, every bias-free ``nn.Linear`` inside ``model``'s transformer blocks whose dimensions are
    multiples of 16 for an :class:`Fp8Linear` holding the same weight; returns how many. The embedding and the
    output projection (outside the blocks) stay as they are. LLaDA: each block's seven projections. LLaDA-MoE:
    the attention projections, the shared expert and dense layers' MLPs; an MoE layer's router keeps its
    precision (its softmax ranks the experts) and its routed experts, stacked parameters run as grouped GEMMs,
    compute in bf16. Runs on any device (a module swap); call it before ``torch.compile`` and before FSDP wraps
    the model."""
    assert recipe != "off"
    swapped = 0
    for block in model.blocks:
        for parent in list(block.modules()):
            if isinstance(parent, SparseMoE):  # the router and the stacked experts
                continue
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child.bias is None and _aligned(child):
                    setattr(parent, name, _fp8_linear(child, recipe == "rowwise"))
                    swapped += 1
    return swapped


def _aligned(linear: nn.Linear) -> bool:
    return linear.in_features % ALIGN == 0 and linear.out_features % ALIGN == 0


def check_fp8_device(recipe: Fp8Recipe, precision: str) -> None:
    """ConfigError unless this process can run ``model.fp8: recipe``: a CUDA GPU with FP8 tensor cores
    (compute capability 8.9 or newer) and bf16 autocast."""
    if recipe == "off":
        return
    key = f"model.fp8: {recipe}"
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{key} needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper or newer) "
            "and this machine has no CUDA GPU; set model.fp8: off"
        )
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        raise ConfigError(
            f"{key} needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper or newer) but "
            f"{torch.cuda.get_device_name()} is {capability[0]}.{capability[1]}; set model.fp8: off"
        )
    if precision != "amp_bf16":
        raise ConfigError(f"{key} computes around bf16: set precision: amp_bf16 (got {precision})")
