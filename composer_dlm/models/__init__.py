"""Models: the LLaDA transformer, its Hugging Face folder format, and its Composer wrapper."""

from composer_dlm.models.hf_format import CheckpointError
from composer_dlm.models.llada import LLaDAConfig, LLaDAModel

__all__ = ["CheckpointError", "LLaDAConfig", "LLaDAModel"]
