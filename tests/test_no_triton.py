"""Where torch ships without Triton (macOS, Windows, some CPU wheels) the package imports and trains.

A subprocess hides `triton` from the import system (a meta-path finder that raises ModuleNotFoundError, as
a missing package does, and a None entry in sys.modules so that availability probes such as transformers'
`importlib.util.find_spec("triton")` answer "absent" instead of raising), imports every module of `composer_dlm` and `kernels`, and runs the quickstart
for two batches with the fused loss, which then takes the plain-PyTorch reference. Only the modules that
hold the Triton kernels themselves may fail to import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, json, pkgutil, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoTriton())
    sys.modules["triton"] = None  # probes (importlib.util.find_spec) then see no Triton, as when missing
    import composer_dlm, kernels

    failed = {}
    for package in (composer_dlm, kernels):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            try:
                importlib.import_module(info.name)
            except ImportError as err:
                failed[info.name] = str(err)
    assert sys.modules.get("triton") is None

    from kernels import masked_ce
    from composer_dlm import train

    calls = []
    reference = masked_ce.masked_linear_cross_entropy_reference
    masked_ce.masked_linear_cross_entropy_reference = lambda *a, **k: calls.append(1) or reference(*a, **k)
    rc = train.main(sys.argv[1:])
    print("RESULT " + json.dumps({"failed": failed, "rc": rc, "reference_calls": len(calls),
                                   "triton_loaded": sys.modules.get("triton") is not None}))
    """
)


@pytest.mark.slow
def test_imports_and_quickstart_without_triton(tmp_path: Path) -> None:
    overrides = {
        "base_path": str(tmp_path),
        "run_name": "no-triton",
        "model.config.d_model": "32",
        "model.config.n_layers": "2",
        "model.config.n_heads": "2",
        "model.config.mlp_hidden_size": "64",
        "model.loss_impl": "fused",
        "max_seq_len": "32",
        "global_train_batch_size": "4",
        "device_train_microbatch_size": "4",
        "max_duration": "2ba",
        "eval_interval": "2ba",
        "eval_subset_num_batches": "1",
        "callbacks.samples.interval": "2ba",
        "callbacks.samples.gen_length": "8",
        "callbacks.samples.steps": "4",
        "train_loader.num_workers": "0",
    }
    argv = [str(ROOT / "yamls" / "quickstart.yaml")] + [f"{k}={v}" for k, v in overrides.items()]
    # The interpreter switch on: without Triton the fused loss must still take the reference, not fail.
    env = os.environ | {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert set(result["failed"]) == {
        "kernels.grouped_mm_triton",
        "kernels.inference_triton",
        "kernels.masked_ce_triton",
    }, result["failed"]
    assert all("triton" in msg for msg in result["failed"].values())
    assert result["rc"] == 0 and not result["triton_loaded"]
    assert result["reference_calls"] >= 2  # one fused-loss call per training batch at least
    assert (tmp_path / "no-triton" / "hf" / "final" / "config.json").is_file()
