"""The package and the kernels type-check cleanly under the [tool.mypy] settings in pyproject.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

api = pytest.importorskip("mypy.api", reason="mypy is a dev dependency (pip install -e '.[dev]')")

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_mypy_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    stdout, stderr, status = api.run(["composer_dlm", "kernels"])
    assert status == 0, f"mypy failed (exit {status}):\n{stdout}{stderr}"
