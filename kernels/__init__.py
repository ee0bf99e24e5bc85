"""Triton kernels and their plain-PyTorch references."""

from kernels.masked_ce import DEFAULT_CONFIG, KernelConfig, masked_linear_cross_entropy
from kernels.masked_ce_reference import masked_linear_cross_entropy_reference

__all__ = [
    "DEFAULT_CONFIG",
    "KernelConfig",
    "masked_linear_cross_entropy",
    "masked_linear_cross_entropy_reference",
]
