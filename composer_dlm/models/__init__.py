"""Models: the LLaDA transformer and its Composer wrapper."""

from composer_dlm.models.llada import CheckpointError, LLaDAConfig, LLaDAModel

__all__ = ["CheckpointError", "LLaDAConfig", "LLaDAModel"]
