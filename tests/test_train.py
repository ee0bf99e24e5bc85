"""The front door: a real Composer run on the embedded corpus writes checkpoints, an HF export and samples,
resumes, and reports user mistakes as one-paragraph errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from composer.core import Callback

from composer_dlm import builders, train
from composer_dlm.checkpoints import checkpoint_listing, manifest_path
from composer_dlm.config import ConfigError, load_config
from composer_dlm.models import LLaDAModel

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "tiny_pretrain_losses.json"


def tiny_overrides(base: Path, **extra: str) -> list[str]:
    over = {
        "base_path": str(base),
        "run_name": "tiny",
        "model.config.d_model": "32",
        "model.config.n_layers": "2",
        "model.config.n_heads": "2",
        "model.config.mlp_hidden_size": "64",
        "model.loss_impl": "plain",
        "max_seq_len": "32",
        "global_train_batch_size": "8",
        "device_train_microbatch_size": "4",
        "device_eval_batch_size": "8",
        "max_duration": "6ba",
        "eval_interval": "3ba",
        "eval_subset_num_batches": "2",
        "checkpoint.save_interval": "3ba",
        "callbacks.samples.interval": "3ba",
        "callbacks.samples.gen_length": "8",
        "callbacks.samples.steps": "4",
        "train_loader.num_workers": "0",
        "logging.console_interval": "1ba",
        "optimizer.lr": "1e-3",
    } | extra
    return [f"{k}={v}" for k, v in over.items()]


class LossTrace(Callback):
    """Records the training loss of every batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def batch_end(self, state, logger) -> None:
        self.losses.append(float(state.loss))


def fit(tmp_path: Path, **extra: str):
    cfg = load_config(ROOT / "yamls" / "quickstart.yaml", tiny_overrides(tmp_path, **extra))
    trace = LossTrace()
    trainer = builders.build_trainer(cfg, extra_callbacks=[trace])
    trainer.fit()
    trainer.close()
    return cfg, trainer, trace.losses


def test_run_writes_checkpoints_export_and_samples_then_resumes(tmp_path, capsys):
    cfg, trainer, losses = fit(tmp_path)
    run = cfg.run_folder
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("ep*-ba*-rank0.pt"))
    assert ckpts == ["ep0-ba3-rank0.pt", "ep0-ba6-rank0.pt"]
    assert (run / "checkpoints" / "latest-rank0.pt").exists()
    for name in ckpts:  # each save wrote its manifest, which the saved file matches
        path = run / "checkpoints" / name
        assert json.loads(manifest_path(path).read_text()) == checkpoint_listing(path)

    exported = LLaDAModel.from_pretrained(run / "hf" / "final", dtype=torch.float32)
    trained = trainer.state.model.model
    ids = torch.randint(0, 4000, (2, 16))
    with torch.no_grad():  # the export is bf16: equal to the trained weights rounded to bf16
        rounded = {k: v.to(torch.bfloat16).float() for k, v in trained.state_dict().items()}
        reference = LLaDAModel(trained.config)
        reference.load_state_dict(rounded)
        assert torch.equal(exported(ids), reference(ids))

    samples = (run / "samples.txt").read_text().splitlines()
    assert [line.split("]")[0] for line in samples[:2]] == ["[sample @ batch 3", "[sample @ batch 3"]
    assert "[sample @ batch 3]" in capsys.readouterr().out

    # Running the finished run again resumes from its last checkpoint, trains nothing and exits cleanly.
    assert train.main([str(ROOT / "yamls" / "quickstart.yaml"), *tiny_overrides(tmp_path)]) == 0
    assert "has already trained to max_duration=6ba" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").glob("ep*-ba*-rank0.pt")) == ckpts

    # Running again with a longer duration resumes at batch 6 instead of starting over.
    _, resumed, more = fit(tmp_path, max_duration="8ba")
    assert int(resumed.state.timestamp.batch) == 8
    assert len(more) == 2


def test_golden_loss_trace(tmp_path):
    """A fixed-seed tiny run's per-step losses, stored; a refactor that changes numerics fails here.

    Regenerate deliberately with UPDATE_GOLDEN=1 (and say why in the commit).
    """
    _, _, losses = fit(
        tmp_path, **{"callbacks.samples": "null", "callbacks.hf_export": "null", "eval_interval": "100ba"}
    )
    import os

    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(losses, indent=1) + "\n")
    expected = json.loads(GOLDEN.read_text())
    # Bit-exact on one machine; across CPU instruction sets float reductions may differ in the last bits.
    assert losses == pytest.approx(expected, rel=1e-5)


def run_main(tmp_path: Path, capsys, *extra: str) -> tuple[int, str]:
    code = train.main([str(ROOT / "yamls" / "quickstart.yaml"), *tiny_overrides(tmp_path), *extra])
    return code, capsys.readouterr().err


def test_typo_is_a_one_paragraph_error(tmp_path, capsys):
    code, err = run_main(tmp_path, capsys, "optimizer.learning_rate=1")
    assert code == 2
    assert err.strip() == (
        "composer-dlm: error: unknown key 'optimizer.learning_rate'; valid keys: lr, betas, eps, weight_decay, fused"
    )


def test_missing_data_folder_is_a_one_paragraph_error(tmp_path, capsys):
    code, err = run_main(tmp_path, capsys, f"train_loader.local={tmp_path / 'nowhere'}")
    assert code == 2 and err.count("\n") == 1
    assert str(tmp_path / "nowhere") in err and "composer-dlm-convert" in err


def test_pretrained_folder_without_config_is_a_one_paragraph_error(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    code, err = run_main(tmp_path, capsys, "model.config=null", f"model.pretrained={tmp_path / 'weights'}")
    assert code == 2 and err.count("\n") == 1
    assert "no config.json" in err and str(tmp_path / "weights") in err


def test_untrusted_load_path_is_refused(tmp_path, capsys):
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes(b"")
    code, err = run_main(tmp_path, capsys, f"checkpoint.load_path={outside}")
    assert code == 2 and "trusted_load_paths" in err


def test_load_path_must_be_a_checkpoint_file_or_a_sharded_folder(tmp_path):
    """A full checkpoint is a file; a sharded one (fsdp.state_dict_type: sharded) is a folder of shards."""
    folder = tmp_path / "tiny" / "checkpoints" / "ep0-ba2"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"")
    (folder.parent / "ep0-ba2-rank0.pt").write_bytes(b"")
    full = load_config(ROOT / "yamls" / "quickstart.yaml", tiny_overrides(tmp_path))
    sharded = load_config(
        ROOT / "yamls" / "quickstart.yaml",
        tiny_overrides(tmp_path, **{"fsdp": "{state_dict_type: sharded}"}),
    )
    full.checkpoint.load_path = sharded.checkpoint.load_path = str(folder)
    assert builders.resolve_load_path(sharded) == str(folder)
    with pytest.raises(ConfigError, match="is not a checkpoint file"):
        builders.resolve_load_path(full)
    full.checkpoint.load_path = sharded.checkpoint.load_path = str(folder.parent / "ep0-ba2-rank0.pt")
    assert builders.resolve_load_path(full) == full.checkpoint.load_path
    with pytest.raises(ConfigError, match="is not a checkpoint folder"):
        builders.resolve_load_path(sharded)
    full.checkpoint.load_path = str(folder.parent / "ep0-ba9-rank0.pt")
    with pytest.raises(ConfigError, match="does not exist"):
        builders.resolve_load_path(full)


def test_sft_run_on_the_embedded_sft_corpus(tmp_path):
    """SFT end to end: the embedded SFT shards give prompt lengths in every batch; it trains and evaluates."""
    seen: list[tuple[int, int]] = []

    class PromptCheck(Callback):
        def after_forward(self, state, logger) -> None:
            b = state.batch
            seen.append((int(b["prompt_lengths"].min()), int(b["input_ids"].shape[1])))

    cfg = load_config(
        ROOT / "yamls" / "quickstart.yaml",
        tiny_overrides(
            tmp_path,
            **{
                "diffusion.mode": "sft",
                "max_seq_len": "256",
                "model.config.max_sequence_length": "256",
                "callbacks.samples": "null",
                "callbacks.hf_export": "null",
                "max_duration": "3ba",
            },
        ),
    )
    trainer = builders.build_trainer(cfg, extra_callbacks=[PromptCheck()])
    trainer.fit()
    assert len(seen) == 6  # 3 batches x 2 microbatches
    assert all(0 < p < length <= 256 for p, length in seen)
    elbo = trainer.state.eval_metrics["eval"]["ELBO"].compute().item()
    assert 0 < elbo < 20


def test_help_lists_every_config_key_with_its_default(capsys):
    import dataclasses
    import typing

    from composer_dlm.config import TrainConfig

    assert train.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "composer composer_dlm/train.py RUN.yaml" in out
    # Spot checks written by hand: a nested default, a literal choice, a required key, an optional section.
    assert "\noptimizer:\n  lr: float = 0.0003\n" in out
    assert "  loss_impl: 'fused' | 'plain' = 'fused'\n" in out
    assert "\nrun_name: str (required)\n" in out
    assert "\neval_loader: (default null)" in out

    # And every field of every section is listed at its depth.
    def keys(cls: type, indent: str = "") -> list[str]:
        found = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            found.append(f"\n{indent}{f.name}:")
            for arg in (hints[f.name], *typing.get_args(hints[f.name])):
                if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                    found += keys(arg, indent + "  ")
        return found

    assert all(k in out for k in keys(TrainConfig))


def test_console_shows_one_compact_line_per_interval(tmp_path, capsys):
    """Composer's per-metric dump is replaced by one line per console_interval; metrics still reach the file."""
    cfg, _, _ = fit(
        tmp_path,
        **{
            "callbacks.samples": "null",
            "callbacks.hf_export": "null",
            "logging.console_interval": "2ba",
            "callbacks.speed_window": "2",
        },
    )
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("[batch ")]
    assert [line.split("]")[0] for line in lines] == ["[batch 2/6", "[batch 4/6", "[batch 6/6"]
    assert all(
        re.fullmatch(r"\[batch \d/6\] loss \d+\.\d{3} \| .*lr \d\.\de[-+]\d\d.*", line) for line in lines
    )
    assert "eval ELBO" in lines[-1]  # evaluated at batch 3
    # Speed from batch 3 on (SpeedMonitor's window of 2 batches needs 3 timestamps), printed with its batch.
    assert [" tok/s | " in line for line in lines] == [False, True, True]
    assert "loss/train/total" not in out + err  # no Composer console dump
    logs = (cfg.run_folder / "logs").glob("rank0-*.txt")
    assert "loss/train/total" in next(logs).read_text()


def test_compact_line_by_hand():
    from composer_dlm.callbacks.console import compact_line, format_duration

    metrics = {
        "loss/train/total": 5.81234,
        "metrics/eval/ELBO": 5.9,
        "throughput/tokens_per_sec": 10234.5,
        "throughput/device/mfu": 0.4131,
        "lr-AdamW/group0": 0.00096,
        "time/remaining_estimate": 0.0347,
    }
    line = compact_line(40, 300, metrics, eta_seconds=125.0)
    assert (
        line
        == "[batch 40/300] loss 5.812 | eval ELBO 5.900 | 10.2k tok/s | MFU 41.3% | lr 9.6e-04 | ETA 2m05s"
    )
    assert compact_line(7, None, {}, None) == "[batch 7]"
    assert [format_duration(s) for s in (42, 125, 3725)] == ["42s", "2m05s", "1h02m"]


def test_remote_load_paths_follow_the_trust_rule(tmp_path):
    cfg = load_config(ROOT / "yamls" / "quickstart.yaml", tiny_overrides(tmp_path))
    cfg.checkpoint.trusted_load_paths = ["s3://bucket/my-run/"]
    for ok in ("s3://bucket/my-run/ep0-ba2-rank0.pt", "s3://bucket/my-run/sub/ep0-ba2-rank0.pt"):
        cfg.checkpoint.load_path = ok
        assert builders.resolve_load_path(cfg) == ok
    for refused in (
        "s3://bucket/my-run-other/ep0-ba2-rank0.pt",  # a prefix of the name is not the folder
        "s3://bucket/my-run/../other/ep0-ba2-rank0.pt",
        "https://example.com/my-run/ep0-ba2-rank0.pt",
    ):
        cfg.checkpoint.load_path = refused
        with pytest.raises(ConfigError, match="is not under any of checkpoint.trusted_load_paths"):
            builders.resolve_load_path(cfg)
    cfg.checkpoint.trusted_load_paths = []  # and nothing remote is trusted by default
    cfg.checkpoint.load_path = "s3://bucket/my-run/ep0-ba2-rank0.pt"
    with pytest.raises(ConfigError, match="trusted_load_paths"):
        builders.resolve_load_path(cfg)


@pytest.mark.gpu
def test_console_line_shows_mfu_on_gpu(tmp_path, capsys):
    """On a GPU that Composer knows the peak of, the compact line carries MFU (from SpeedMonitor's flops)."""
    fit(
        tmp_path,
        **{
            "callbacks.samples": "null",
            "callbacks.hf_export": "null",
            "logging.console_interval": "3ba",
            "callbacks.speed_window": "2",
            "precision": "amp_bf16",
        },
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[batch ")]
    assert re.search(r" tok/s \| MFU \d+\.\d% \| lr ", lines[-1]), lines
