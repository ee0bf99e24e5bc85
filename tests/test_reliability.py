"""NaN guard, batch-geometry errors and a disk-full checkpoint save, on real tiny runs."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from composer.core import Callback
from test_train import ROOT, tiny_overrides

from composer_dlm import builders, run_lock, train
from composer_dlm.callbacks.nan_guard import NonFiniteLossError
from composer_dlm.checkpoints import ResumeMismatchError, RunIdentity, check_resume, prune_checkpoints
from composer_dlm.config import ConfigError, load_config
from composer_dlm.run_lock import RunLock, RunLockedError


class PoisonLoss(Callback):
    """Makes the loss NaN at the given batches (1-based) and records whether each step changed the weights."""

    def __init__(self, batches: set[int]) -> None:
        self.batches = batches
        self.before: dict[str, torch.Tensor] = {}
        self.changed: dict[int, bool] = {}

    def batch_start(self, state, logger) -> None:
        self.before = {k: v.detach().clone() for k, v in state.model.state_dict().items()}

    def after_loss(self, state, logger) -> None:
        if int(state.timestamp.batch) + 1 in self.batches:
            state.loss = state.loss * float("nan")

    def batch_end(self, state, logger) -> None:
        after = state.model.state_dict()
        self.changed[int(state.timestamp.batch)] = any(
            not torch.equal(self.before[k], after[k]) for k in after
        )


def build(tmp_path, poison: PoisonLoss, **extra: str):
    over = {
        "callbacks.samples": "null",
        "callbacks.hf_export": "null",
        "eval_interval": "100ba",
        "checkpoint.save_interval": "2ba",
        "device_train_microbatch_size": "8",
        "scheduler.t_warmup": "0ba",
    } | extra
    cfg = load_config(ROOT / "yamls" / "quickstart.yaml", tiny_overrides(tmp_path, **over))
    return cfg, builders.build_trainer(cfg, extra_callbacks=[poison])


def test_nan_steps_are_skipped_and_training_continues(tmp_path):
    poison = PoisonLoss({3})
    _, trainer = build(tmp_path, poison)
    trainer.fit()
    assert poison.changed == {1: True, 2: True, 3: False, 4: True, 5: True, 6: True}
    assert all(torch.isfinite(p).all() for p in trainer.state.model.parameters())


def test_consecutive_nans_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    poison = PoisonLoss({3, 4, 5})
    cfg, trainer = build(tmp_path, poison, **{"callbacks.nan_guard.max_consecutive": "2"})
    with pytest.raises(
        NonFiniteLossError, match="2 consecutive non-finite losses/gradients, the last at batch 3"
    ):
        trainer.fit()
    folder = cfg.run_folder / "checkpoints"
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba2-rank0.pt"
    state = torch.load(folder / "latest-rank0.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["state"]["model"].values())


def test_global_batch_must_divide_by_world_size(tmp_path, monkeypatch):
    cfg = load_config(
        ROOT / "yamls" / "quickstart.yaml", tiny_overrides(tmp_path, global_train_batch_size="10")
    )
    monkeypatch.setattr(builders.dist, "get_world_size", lambda: 4)
    with pytest.raises(
        ConfigError, match=r"global_train_batch_size \(10\) is not divisible by the number of processes \(4\)"
    ):
        builders.device_batch_size(cfg)


def test_disk_full_during_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import composer.utils.checkpoint as ckpt

    original = ckpt._write_checkpoint_file
    calls = {"n": 0}

    def write(state_dict, filename):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save runs out of space halfway
            with open(filename, "wb") as f:
                f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(state_dict, filename)

    monkeypatch.setattr(ckpt, "_write_checkpoint_file", write)
    cfg, trainer = build(tmp_path, PoisonLoss(set()))
    with pytest.raises(OSError, match="No space left"):
        trainer.fit()
    trainer.close()
    monkeypatch.setattr(ckpt, "_write_checkpoint_file", original)
    # The next start repairs the folder and resumes from the complete checkpoint at batch 2.
    cfg, resumed = build(tmp_path, PoisonLoss(set()))
    assert int(resumed.state.timestamp.batch) == 2
    assert (cfg.run_folder / "checkpoints" / "ep0-ba4-rank0.pt.incomplete").exists()
    resumed.fit()
    assert int(resumed.state.timestamp.batch) == 6


# --- one run per folder, retention across restarts, resume mismatches ------------------------------------------


def train_process(tmp_path, *extra: str) -> subprocess.Popen:
    """`python -m composer_dlm.train` on the tiny quickstart config, as its own process."""
    over = tiny_overrides(tmp_path, **{"callbacks.samples": "null", "callbacks.hf_export": "null"})
    argv = [
        sys.executable,
        "-m",
        "composer_dlm.train",
        str(ROOT / "yamls" / "quickstart.yaml"),
        *over,
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )


def test_a_second_run_in_the_same_folder_is_refused_until_the_first_dies(tmp_path, capsys):
    first = train_process(tmp_path, "max_duration=100000ba", "checkpoint.save_interval=2ba")
    lock = tmp_path / "tiny" / ".lock"
    deadline = time.monotonic() + 120
    while f"pid {first.pid} " not in (lock.read_text() if lock.exists() else ""):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.2)
    second = [str(ROOT / "yamls" / "quickstart.yaml"), *tiny_overrides(tmp_path, max_duration="2ba")]
    try:
        assert train.main(second) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("composer-dlm: error: run folder ")
        assert f"{tmp_path / 'tiny'} is in use by another run (pid {first.pid} on host " in err
        assert "another run_name" in err
        assert first.poll() is None  # the refused run did not disturb the first
    finally:
        first.kill()  # SIGKILL: no clean-up runs; the kernel drops the lock with the process
        first.wait()
    assert train.main(second) == 0  # resumes from what the killed run saved and finishes
    assert "in use" not in capsys.readouterr().err


def checkpoint_names(folder) -> list[str]:
    return sorted((p.name for p in folder.glob("ep*-ba*-rank0.pt")), key=lambda n: int(n.split("-")[1][2:]))


def test_retention_counts_the_checkpoints_of_earlier_processes(tmp_path):
    """Composer's save_num_checkpoints_to_keep counts only its own process's saves; ours counts the folder."""
    over = {
        "callbacks.samples": "null",
        "callbacks.hf_export": "null",
        "eval_interval": "100ba",
        "checkpoint.save_interval": "1ba",
        "checkpoint.save_num_checkpoints_to_keep": "2",
    }
    for duration in ("3ba", "5ba", "7ba"):  # a run, then two restarts that train further
        cfg = load_config(
            ROOT / "yamls" / "quickstart.yaml", tiny_overrides(tmp_path, max_duration=duration, **over)
        )
        trainer = builders.build_trainer(cfg)
        trainer.fit()
        trainer.close()
        folder = cfg.checkpoint_folder
        last = int(duration[:-2])
        assert checkpoint_names(folder) == [f"ep0-ba{last - 1}-rank0.pt", f"ep0-ba{last}-rank0.pt"]
        assert os.readlink(folder / "latest-rank0.pt") == f"ep0-ba{last}-rank0.pt"
    # Checkpoints beyond the limit already on disk (an older version, a lower limit) are pruned at start-up.
    for batch in (1, 2):
        shutil.copy(folder / "ep0-ba6-rank0.pt", folder / f"ep0-ba{batch}-rank0.pt")
    cfg = load_config(
        ROOT / "yamls" / "quickstart.yaml", tiny_overrides(tmp_path, max_duration="7ba", **over)
    )
    builders.build_trainer(cfg).close()
    assert checkpoint_names(folder) == ["ep0-ba6-rank0.pt", "ep0-ba7-rank0.pt"]


def test_pruning_keeps_the_newest_and_the_one_latest_points_to(tmp_path):
    for batch in (2, 4, 6, 8):
        (tmp_path / f"ep0-ba{batch}-rank0.pt").write_bytes(b"x")
    (tmp_path / "ep0-ba8-rank1.pt").write_bytes(b"x")  # another rank's file: not this rank's to count
    (tmp_path / "ep0-ba4-rank0.pt.incomplete").write_bytes(b"x")  # moved aside by the repair: left alone
    os.symlink("ep0-ba2-rank0.pt", tmp_path / "latest-rank0.pt")
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["ep0-ba4-rank0.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ep0-ba2-rank0.pt",
        "ep0-ba4-rank0.pt.incomplete",
        "ep0-ba6-rank0.pt",
        "ep0-ba8-rank0.pt",
        "ep0-ba8-rank1.pt",
        "latest-rank0.pt",
    ]
    assert prune_checkpoints(tmp_path, keep=-1) == []  # Composer's "keep all"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run trained 4 batches of 8 samples (checkpoints at 2 and 4) on a 40-sample subset of the data."""
    base = tmp_path_factory.mktemp("resume")
    over = {
        "callbacks.samples": "null",
        "callbacks.hf_export": "null",
        "eval_interval": "100ba",
        "checkpoint.save_interval": "2ba",
        "max_duration": "4ba",
        "train_loader.subset_size": "40",
    }
    cfg = load_config(ROOT / "yamls" / "quickstart.yaml", tiny_overrides(base, **over))
    trainer = builders.build_trainer(cfg)
    trainer.fit()
    trainer.close()
    return base, over


def snapshot(folder) -> dict[str, float]:
    """Every file's modification time, but the lock's (each start rewrites the holder's pid in it)."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock")
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in files}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"model.config.d_model": "48"},
            r"ep0-ba4-rank0\.pt does not fit the model as configured: model\.model\.transformer\.wte\.weight is \(\d+, 32\) float32 "
            r"there, \(\d+, 48\) float32 here; .* Undo the change to the model, or give this run another run_name",
        ),
        (
            {"model.config.n_layers": "3"},
            r"does not fit the model as configured: \S+\.blocks\.2\.\S+ is missing",
        ),
        (
            {"train_loader.subset_size": "16", "max_duration": "8ba"},
            r"ep0-ba4-rank0\.pt is 32 samples into its epoch but the training data now has 16 samples per epoch "
            r"\(did it shrink\?\); give the run its data back, or start a new run from its weights: run_name=NEW "
            r"checkpoint\.load_path=\S+ep0-ba4-rank0\.pt checkpoint\.load_weights_only=true "
            r"checkpoint\.trusted_load_paths=\[\S+checkpoints\]",
        ),
    ],
    ids=["d_model", "n_layers", "smaller-data"],
)
def test_resume_mismatch_is_one_line_at_start_up(trained_run, capsys, change, message):
    base, over = trained_run
    before = snapshot(base / "tiny")
    code = train.main([str(ROOT / "yamls" / "quickstart.yaml"), *tiny_overrides(base, **(over | change))])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("composer-dlm: error: the checkpoint ")
    assert re.search(message, err), err
    assert snapshot(base / "tiny") == before  # nothing written, nothing pruned, the lock released
    lock = RunLock(base / "tiny")
    lock.acquire()  # released by the refused run
    lock.release()


def test_resume_with_another_tokenizer_is_refused(trained_run):
    """The tokenizer's fingerprint travels in the checkpoint (RunIdentity's state) and is compared on resume."""
    base, _ = trained_run
    checkpoint = base / "tiny" / "checkpoints" / "ep0-ba4-rank0.pt"
    saved = torch.load(checkpoint, weights_only=False)["state"]["callbacks"]["RunIdentity"]
    assert saved["tokenizer"] == "embedded" and len(saved["tokenizer_fingerprint"]) == 16
    model_state = {k: v for k, v in torch.load(checkpoint, weights_only=False)["state"]["model"].items()}
    with pytest.raises(ResumeMismatchError, match=r"was trained with the tokenizer 'embedded' \(fingerprint \w+\), "
                       r"this run uses '/tok' \(fingerprint 0123456789abcdef\); set tokenizer.name back, or NEW"):  # fmt: skip
        check_resume(
            checkpoint,
            model_state=model_state,
            frozen=set(),
            identity=RunIdentity("/tok", "0123456789abcdef"),
            dataset_samples=None,
            world_size=1,
            weights_only=True,
            fix_model="NEW",
            fix_data="DATA",
        )
    # The same checkpoint against its own run's identity passes.
    check_resume(
        checkpoint,
        model_state=model_state,
        frozen=set(),
        identity=RunIdentity("embedded", saved["tokenizer_fingerprint"]),
        dataset_samples=40,
        world_size=1,
        weights_only=False,
        fix_model="NEW",
        fix_data="DATA",
    )


def test_lock_is_free_once_its_holder_dies_even_with_forked_children_alive(tmp_path):
    """Data loader workers are forked from the run; they must not keep the lock of a killed run."""
    holder = (
        "import os, sys, time\n"
        "from composer_dlm.run_lock import RunLock\n"
        f"RunLock({str(tmp_path)!r}).acquire()\n"
        "child = os.fork()\n"
        "if child == 0:\n    time.sleep(60)\n    os._exit(0)\n"
        "print(child, flush=True)\n"
        "time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True, env=env)
    child = int(proc.stdout.readline())
    try:
        with pytest.raises(RunLockedError, match=rf"is in use by another run \(pid {proc.pid} on host "):
            RunLock(tmp_path).acquire()
        proc.kill()
        proc.wait()
        os.kill(child, 0)  # the forked child is still alive ...
        lock = RunLock(tmp_path)
        lock.acquire()  # ... and the lock is free
        lock.release()
    finally:
        proc.kill()
        os.kill(child, signal.SIGKILL)


def test_optimizer_under_fsdp_amp_fp16_takes_the_shape_of_found_inf_the_sharded_scaler_hands_it(monkeypatch):
    """torch's ShardedGradScaler (FSDP + amp_fp16) passes a one-element ``found_inf`` to the optimizer step: fused
    AdamW rejects it, so there the default is the foreach implementation, and an explicit fused choice is refused.
    A GPU is faked (``torch.cuda.is_available``) so that the default would otherwise be fused."""
    from composer_dlm.config import OptimizerConfig

    def step(opt: torch.optim.Optimizer) -> None:
        opt.grad_scale, opt.found_inf = None, torch.full((1,), 0.0)  # what GradScaler.step sets for fused
        opt.step()

    model = torch.nn.Linear(4, 4)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="shape"):  # torch's behaviour the choice works around
        step(torch.optim.AdamW(model.parameters(), fused=True))
    with monkeypatch.context() as m:  # the step below runs with the real (CPU) torch.cuda
        m.setattr(torch.cuda, "is_available", lambda: True)
        assert builders.build_optimizer(OptimizerConfig(), model).defaults["fused"] is True  # the GPU default
        opt = builders.build_optimizer(OptimizerConfig(), model, sharded_fp16=True)
    assert opt.defaults["fused"] is False
    before = model.weight.detach().clone()
    opt.step()  # the foreach implementation never takes found_inf: GradScaler unscales and skips for it
    assert not torch.equal(before, model.weight)
    with pytest.raises(ConfigError, match="optimizer.fused: true fails under fsdp with precision amp_fp16"):
        builders.build_optimizer(OptimizerConfig(fused=True), model, sharded_fp16=True)


def no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without flock (some NFS and Lustre mounts): the call fails with ENOLCK."""

    def flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", flock)


def test_without_flock_the_lock_is_an_exclusive_owner_file(tmp_path, monkeypatch):
    no_flock(monkeypatch)
    first = RunLock(tmp_path / "run")
    first.acquire()
    owner = tmp_path / "run" / ".lock.owner"
    assert owner.read_text() == f"pid {os.getpid()} on host {socket.gethostname()}\n"
    with pytest.raises(RunLockedError, match=rf"in use by another run \(pid {os.getpid()} on host .*has no flock, "
                       rf"so the lock is the file {owner}: .*set checkpoint.lock=false"):  # fmt: skip
        RunLock(tmp_path / "run").acquire()
    first.release()
    assert not owner.exists()
    second = RunLock(tmp_path / "run")
    second.acquire()
    second.release()


def test_without_flock_a_stale_owner_file_is_taken_over_only_on_its_host(tmp_path, monkeypatch):
    no_flock(monkeypatch)
    owner = tmp_path / ".lock.owner"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    owner.write_text(
        f"pid {int(dead.stdout)} on host {socket.gethostname()}\n"
    )  # killed hard: its file stayed
    lock = RunLock(tmp_path)
    lock.acquire()
    assert owner.read_text().startswith(f"pid {os.getpid()} ")
    lock.release()
    owner.write_text(f"pid {int(dead.stdout)} on host another-node-7\n")  # cannot be judged from here
    with pytest.raises(RunLockedError, match="another-node-7"):
        RunLock(tmp_path).acquire()
    assert owner.read_text().endswith("another-node-7\n")


def test_unlockable_run_folder_is_one_line_and_removed(tmp_path, monkeypatch, capsys):
    """Neither flock nor an exclusive create works: one line naming checkpoint.lock=false, exit 2, no run folder
    left behind; with checkpoint.lock=false the start goes past the lock."""
    no_flock(monkeypatch)
    real_open = os.open

    def no_exclusive_create(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & os.O_EXCL:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(run_lock.os, "open", no_exclusive_create)
    args = [str(ROOT / "yamls" / "quickstart.yaml"), *tiny_overrides(tmp_path)]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"composer-dlm: error: cannot lock the run folder {tmp_path}"
    )
    assert "set checkpoint.lock=false" in err
    assert not (tmp_path / "tiny").exists()
    cfg = load_config(
        ROOT / "yamls" / "quickstart.yaml", [*tiny_overrides(tmp_path), "checkpoint.lock=false"]
    )
    lock = RunLock(cfg.run_folder)
    builders.start_run(cfg, lock)
    assert not lock.held
