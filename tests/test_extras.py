"""The suite without the optional extras (hf, s3, lora, eval): every module collects, the extras' tests skip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# pytest as a user without the extras runs it: the extras' packages cannot be found (importlib's path finder
# answers None for them, as for any package that is not installed).
WITHOUT_EXTRAS = r"""
import sys
from importlib.machinery import PathFinder

import pytest

EXTRAS = {"datasets", "boto3", "moto", "peft", "lm_eval"}


class WithoutExtras(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] in EXTRAS else super().find_spec(name, path, target)


sys.meta_path[:] = [WithoutExtras if f is PathFinder else f for f in sys.meta_path]
sys.exit(pytest.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_gpu_selection_collects_without_the_extras():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_EXTRAS,
            "--collect-only",
            "-q",
            "-m",
            "gpu",
            "-p",
            "no:cacheprovider",
            "tests",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "error" not in done.stdout.lower()
    assert "SKIPPED [1] tests/test_data_hf.py" in done.stdout  # the hf extra's module is skipped, not broken
