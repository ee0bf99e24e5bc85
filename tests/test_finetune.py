"""Fine-tuning a released LLaDA checkpoint the way a user does: a bf16 release-style folder (with LLaDA's
modeling files and auto_map beside the weights), ``composer_dlm.train`` with ``model.pretrained``, and an export
that replaces the release folder.

The release folder is written here: random bf16 weights under LLaDA's tensor names, the embedded tokenizer,
stand-ins for ``modeling_llada.py`` / ``configuration_llada.py`` (our own few lines, only to check they travel).
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults import run_ranks
from test_hf_format import LLADA_RELEASE_KEYS

from composer_dlm import train
from composer_dlm.data import load_tokenizer, mask_token_id
from composer_dlm.generate_cli import main as generate_main
from composer_dlm.models import LLaDAModel
from composer_dlm.models.composer_llada import llada_weights

ROOT = Path(__file__).resolve().parents[1]
AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModel": "modeling_llada.LLaDAModelLM",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
}
MODELING_FILES = {
    "configuration_llada.py": "# stand-in for LLaDA's configuration module\n",
    "modeling_llada.py": "# stand-in for LLaDA's modeling module\n",
}


def write_release_folder(folder: Path) -> Path:
    """A small bf16 LLaDA folder laid out as the release is: weights, config.json with auto_map, modeling files,
    tokenizer, generation_config.json."""
    tokenizer = load_tokenizer("embedded")
    config = dict(
        d_model=32,
        n_layers=2,
        n_heads=2,
        mlp_hidden_size=64,
        vocab_size=len(tokenizer),
        max_sequence_length=128,
        rope_theta=500000.0,
        mask_token_id=mask_token_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LLaDAModel.from_config(config, seed=5)
    model.save_pretrained(folder, dtype=torch.bfloat16, tokenizer=tokenizer)
    data = json.loads((folder / "config.json").read_text())
    data["auto_map"] = AUTO_MAP
    (folder / "config.json").write_text(json.dumps(data))
    for name, text in MODELING_FILES.items():
        (folder / name).write_text(text)
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 7, "marker": "from the release"})
    )
    return folder


def finetune_overrides(base: Path, pretrained: Path, **extra: str) -> list[str]:
    over = {
        "base_path": str(base),
        "run_name": "ft",
        "model.config": "null",
        "model.pretrained": str(pretrained),
        "model.loss_impl": "plain",
        "max_seq_len": "32",
        "global_train_batch_size": "8",
        "device_train_microbatch_size": "8",
        "max_duration": "4ba",
        "eval_interval": "100ba",
        "callbacks.samples": "null",
        "checkpoint.save_interval": "4ba",
        "train_loader.num_workers": "0",
        "eval_loader": "null",
        "optimizer.lr": "2.5e-5",
        "scheduler.name": "constant",
        "scheduler.t_warmup": "0ba",
    } | extra
    return [f"{k}={v}" for k, v in over.items()]


def check_finetuned(run: Path, start: dict[str, torch.Tensor]) -> dict:
    """The fine-tuning run in ``run`` (run folder) from the weights ``start``: its last Composer checkpoint holds
    finite fp32 parameters of which almost every element moved (in bf16 most updates at this learning rate round
    away: 29% of elements moved, issue 14), and its final export states LLaDA's release keys and holds those
    weights rounded to bf16. Returns the checkpoint."""
    ckpt = torch.load(run / "checkpoints" / "latest-rank0.pt", map_location="cpu", weights_only=False)
    params = llada_weights(ckpt["state"]["model"])
    assert set(params) == set(start)
    assert {v.dtype for v in params.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in params.values()), "a rank trained on unsynced (NaN) weights"
    moved = sum(int((params[k] != start[k]).sum()) for k in start)
    total = sum(v.numel() for v in start.values())
    assert moved / total > 0.9, f"only {moved / total:.1%} of weight elements changed"
    written = json.loads((run / "hf" / "final" / "config.json").read_text())
    for key, value in LLADA_RELEASE_KEYS.items():
        assert written[key] == value, key
    exported = LLaDAModel.from_pretrained(run / "hf" / "final", dtype=torch.float32)
    for name, tensor in exported.state_dict().items():  # the trained weights, rounded to bf16
        assert torch.equal(tensor, params[name].to(torch.bfloat16).float()), name
    return ckpt


def test_finetune_bf16_release_keeps_fp32_masters_and_exports_a_release_folder(tmp_path, capsys):
    release = write_release_folder(tmp_path / "release")
    start = {k: v.float() for k, v in LLaDAModel.from_pretrained(release).state_dict().items()}
    args = [str(ROOT / "yamls" / "quickstart.yaml"), *finetune_overrides(tmp_path, release)]
    assert train.main(args) == 0

    # The Composer checkpoint holds fp32 parameters and fp32 optimizer state; the export its weights in bf16.
    ckpt = check_finetuned(tmp_path / "ft", start)
    opt_state = next(iter(ckpt["state"]["optimizers"].values()))["state"]
    assert {t.dtype for s in opt_state.values() for t in s.values() if t.ndim > 0} == {torch.float32}

    # The export replaces the release folder: release keys, auto_map and modeling files, tokenizer, the
    # release's generation config; world-readable; loads and samples without flags.
    export = tmp_path / "ft" / "hf" / "final"
    written = json.loads((export / "config.json").read_text())
    assert written["auto_map"] == AUTO_MAP and written["rope_theta"] == 500000.0
    for name, text in MODELING_FILES.items():
        assert (export / name).read_text() == text
    assert json.loads((export / "generation_config.json").read_text())["marker"] == "from the release"
    assert (export / "tokenizer.json").is_file() and (export / "tokenizer_config.json").is_file()
    for path in export.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, f"{path.name} is not world-readable"

    capsys.readouterr()
    # 3: sampled, but only special tokens came out (an undertrained model); 2 would be an error.
    code = generate_main([str(export), "--prompt", "The", "--gen-length", "8"])
    assert code in (0, 3) and "error" not in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_finetune_with_two_processes_through_the_launcher(tmp_path):
    """``composer -n 2 composer_dlm/train.py ...`` (DDP on CPU): every rank reads the bf16 folder into fp32
    masters; the run's checkpoint and export hold the trained fp32 weights."""
    release = write_release_folder(tmp_path / "release")
    start = {k: v.float() for k, v in LLaDAModel.from_pretrained(release).state_dict().items()}
    train_py, quickstart = str(ROOT / "composer_dlm" / "train.py"), str(ROOT / "yamls" / "quickstart.yaml")
    overrides = finetune_overrides(tmp_path, release, device_train_microbatch_size="4")
    run_ranks(2, [train_py, quickstart, *overrides], {"TRITON_INTERPRET": "0"})
    check_finetuned(tmp_path / "ft", start)


# One of two gloo ranks, run as its own small process (torch and our model only, for a quick start): local rank 0
# reads the folder, rank 1 starts on the meta device (as ``builders.receives_weights`` decides); both are wrapped
# by torch's FSDP1 the way Composer wraps them (its ``param_init_fn`` moves meta parameters to the device empty,
# then calls the model's ``param_init_fn``), with ``sync_module_states`` on and, as a control, off.
FSDP_RANK = """
import functools, sys
import torch, torch.distributed as dist
import torch.distributed.fsdp._init_utils as fsdp_init
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
from composer_dlm.models import LLaDAModel
from composer_dlm.models.llada import LLaDABlock

rank, folder, tmp = int(sys.argv[1]), sys.argv[2], sys.argv[3]
# FSDP1 broadcasts only from GPUs; on CPU its guard refuses. The broadcast itself runs on gloo.
fsdp_init._check_module_states_for_sync_module_states = lambda states: None
dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
for sync in (True, False):
    model = LLaDAModel.from_pretrained(folder, dtype=torch.float32, device=None if rank == 0 else "meta")

    def composer_init(module):
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            model.param_init_fn(module)

    wrapped = FSDP(
        model,
        auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, LLaDABlock)),
        use_orig_params=True, device_id=torch.device("cpu"), sync_module_states=sync, param_init_fn=composer_init,
    )
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
        torch.save(wrapped.state_dict(), f"{tmp}/rank{rank}-sync{int(sync)}.pt")
dist.destroy_process_group()
"""


def test_meta_rank_gets_the_weights_from_fsdps_broadcast(tmp_path):
    """Lean start-up: a rank that built the model on the meta device ends with the folder's weights (as fp32) once
    FSDP wraps it with ``sync_module_states``; without the broadcast it would hold NaN, not plausible values."""
    folder = tmp_path / "release"
    LLaDAModel.from_config(
        dict(d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64, vocab_size=64, mask_token_id=63), seed=1
    ).save_pretrained(folder, dtype=torch.bfloat16)
    ranks = [
        subprocess.Popen([sys.executable, "-c", FSDP_RANK, str(rank), str(folder), str(tmp_path)], cwd=ROOT)
        for rank in (0, 1)
    ]
    assert [p.wait(timeout=300) for p in ranks] == [0, 0]
    expected = LLaDAModel.from_pretrained(folder, dtype=torch.float32).state_dict()
    for rank in (0, 1):
        synced = torch.load(tmp_path / f"rank{rank}-sync1.pt")
        assert all(torch.equal(synced[k], expected[k]) for k in expected), f"rank {rank}"
        # Without the broadcast, FSDP's unsharded view mixes rank 0's shards with rank 1's NaN placeholders.
        unsynced = torch.load(tmp_path / f"rank{rank}-sync0.pt")
        assert any(torch.isnan(v).any() for v in unsynced.values()), f"rank {rank}"


def test_the_reading_rank_loads_onto_its_gpu_only_when_the_model_fits(tmp_path, monkeypatch):
    """``builders.read_device`` in isolation (a GPU faked): the GPU when the model in its master dtype takes under
    80% of the free memory, else the CPU; ``model.load_on_gpu`` forces either; no GPU means the CPU."""
    from composer_dlm import builders
    from composer_dlm.config import load_config

    release = write_release_folder(tmp_path / "release")
    # Counted from the loaded tensors, not with the config's formula that read_device itself uses.
    params = sum(p.numel() for p in LLaDAModel.from_pretrained(release).parameters())
    need = params * 4  # fp32 bytes

    def cfg(*extra: str):
        return load_config(
            ROOT / "yamls" / "quickstart.yaml", finetune_overrides(tmp_path, release) + list(extra)
        )

    monkeypatch.setattr(builders.dist, "get_local_rank", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 10 * free["bytes"]))
    for free_bytes, expected in [(int(need / 0.8) + 1024, "cuda:1"), (int(need / 0.8) - 1024, "cpu")]:
        free["bytes"] = free_bytes
        assert str(builders.read_device(cfg(), release, torch.float32)) == expected
    # Room for the bf16 weights (2 bytes a parameter) but not for fp32 ones: the master dtype decides.
    free["bytes"] = int(params * 2 / 0.8) + 1024
    assert str(builders.read_device(cfg(), release, torch.bfloat16)) == "cuda:1"
    assert str(builders.read_device(cfg(), release, torch.float32)) == "cpu"
    free["bytes"] = int(params * 2 / 0.8) - 1024
    assert str(builders.read_device(cfg(), release, torch.bfloat16)) == "cpu"
    assert str(builders.read_device(cfg("model.load_on_gpu=true"), release, torch.float32)) == "cuda:1"
    free["bytes"] = 10 * need
    assert str(builders.read_device(cfg("model.load_on_gpu=false"), release, torch.float32)) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert str(builders.read_device(cfg("model.load_on_gpu=true"), release, torch.float32)) == "cpu"
