"""Triton kernels and their plain-PyTorch references.

Triton is imported only when a kernel runs (kernels.masked_ce_triton, kernels.inference_triton), so this
package, and the CPU path through the references, work where torch ships without Triton.
"""

from kernels.masked_ce import DEFAULT_CONFIG, KernelConfig, masked_linear_cross_entropy
from kernels.masked_ce_reference import masked_linear_cross_entropy_reference

__all__ = [
    "DEFAULT_CONFIG",
    "KernelConfig",
    "masked_linear_cross_entropy",
    "masked_linear_cross_entropy_reference",
]
