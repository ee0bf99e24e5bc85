"""Shared pytest setup.

Triton kernels run in the CPU interpreter when no GPU is present. The interpreter must be switched on
before Triton is imported anywhere, so it is decided here from the presence of an NVIDIA device node
rather than by importing torch.
"""

from __future__ import annotations

import os
import pathlib

if not pathlib.Path("/dev/nvidia0").exists() and not pathlib.Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The embedded tokenizer and corpus are built once per test session in a private cache, never in ~/.cache.
if "COMPOSER_DLM_CACHE" not in os.environ:
    import tempfile

    os.environ["COMPOSER_DLM_CACHE"] = tempfile.mkdtemp(prefix="composer-dlm-test-cache-")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests are skipped without CUDA. ``world_size(n)`` tests start n processes through Composer's
    launcher themselves: on CPU any n runs (gloo); a ``gpu`` test with ``world_size(n)`` needs n GPUs."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("world_size")
        needed = int(marker.args[0]) if marker is not None and marker.args else 1
        if "gpu" in item.keywords and gpus < needed:
            reason = "needs CUDA" if gpus == 0 else f"needs {needed} GPUs, found {gpus}"
            item.add_marker(pytest.mark.skip(reason=reason))
