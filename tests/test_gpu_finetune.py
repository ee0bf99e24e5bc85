"""Fine-tuning a bf16 release-style folder under FSDP FULL_SHARD on GPUs, through Composer's launcher (the GPU
machine has no ``composer`` on PATH: ``python -m composer.cli.launcher``). Ranks other than local rank 0 build
the model on the meta device and receive the weights from FSDP's broadcast (``fsdp.sync_module_states``).

    python -m pytest tests/test_gpu_finetune.py -m gpu -q
"""

from __future__ import annotations

import pytest
from faults import ROOT, run_ranks
from test_finetune import check_finetuned, finetune_overrides, write_release_folder

from composer_dlm.models import LLaDAModel

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.world_size(2))])
def test_fsdp_full_shard_finetune_keeps_fp32_masters(tmp_path, nproc):
    release = write_release_folder(tmp_path / "release")
    start = {k: v.float() for k, v in LLaDAModel.from_pretrained(release).state_dict().items()}
    overrides = finetune_overrides(
        tmp_path,
        release,
        **{
            "fsdp": "{sharding_strategy: FULL_SHARD}",
            "precision": "amp_bf16",
            "device_train_microbatch_size": "4",
        },
    )
    train = str(ROOT / "composer_dlm" / "train.py")
    quickstart = str(ROOT / "yamls" / "quickstart.yaml")
    run_ranks(nproc, [train, quickstart, *overrides], env={"TRITON_INTERPRET": "0"})
    check_finetuned(tmp_path / "ft", start)
