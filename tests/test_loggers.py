"""Composer's logger destinations from the YAML's ``loggers:`` section, and the end-of-run loss plot: a tiny real
run from the quickstart YAML with every backend on, offline (MLflow file store and W&B offline mode under tmp,
TensorBoard event files), each checked for what it wrote; the PNG checked against the run's log file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image
from tiny_runs import QUICKSTART, embedded_run_overrides

from composer_dlm import builders
from composer_dlm.callbacks.loss_plot import EVAL_ELBO, TRAIN_LOSS, Curves, LossCurves, draw, moving_average
from composer_dlm.config import ConfigError, load_config

STEPS = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("loggers")
    mlruns = base / "mlruns"
    overrides = embedded_run_overrides(base, "logged", f"{STEPS}ba") + [
        "callbacks.hf_export=null",
        "loggers.tensorboard={}",
        "loggers.wandb={mode: offline, project: dlm-test}",
        f"loggers.mlflow={{tracking_uri: '{mlruns.as_uri()}', experiment: dlm-exp}}",
    ]
    cfg = load_config(QUICKSTART, overrides)
    trainer = builders.build_trainer(cfg)
    trainer.fit()
    trainer.close()
    (recorder,) = [c for c in trainer.state.callbacks if isinstance(c, LossCurves)]
    return {"folder": cfg.run_folder, "mlruns": mlruns, "curves": recorder.curves}


def logged(folder: Path, name: str) -> dict[int, float]:
    """``name``'s values by batch, read from the run's text log (Composer's FileLogger, 4 decimals)."""
    (log,) = (folder / "logs").glob("rank0-*.txt")
    pattern = re.compile(rf"\[metric\]\[batch=(\d+)\]: {re.escape(name)}: (\S+)")
    return {int(m[1]): float(m[2]) for m in pattern.finditer(log.read_text())}


def test_tensorboard_writes_event_files_with_the_loss(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run["folder"] / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    scalars: dict[str, list[float]] = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    assert len(scalars[TRAIN_LOSS]) == STEPS
    expected = logged(run["folder"], TRAIN_LOSS)
    assert sorted(scalars[TRAIN_LOSS]) == pytest.approx(sorted(expected.values()), abs=5e-5)


def test_wandb_offline_writes_a_run_to_sync_later(run):
    (offline,) = (run["folder"] / "wandb").glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")
    assert records.stat().st_size > 0
    assert TRAIN_LOSS.encode() in records.read_bytes()  # the metric's key is in the run's records


def test_mlflow_writes_the_metrics_to_its_file_store(run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=run["mlruns"].as_uri())
    experiment = client.get_experiment_by_name("dlm-exp")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_name == "logged"
    history = client.get_metric_history(mlrun.info.run_id, TRAIN_LOSS)
    assert {h.step: h.value for h in history} == pytest.approx(logged(run["folder"], TRAIN_LOSS), abs=5e-5)


def test_loss_plot_is_a_png_of_the_logged_values(run):
    png = run["folder"] / "plots" / "loss.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 500
        image.verify()
    assert [p.name for p in png.parent.iterdir()] == ["loss.png"]  # no staging file left
    # The run's curves against its text log: a batch's loss is logged at the step before it (0 for the first
    # batch) and drawn at the batch's number; an evaluation is logged and drawn at the batches trained.
    losses, elbos = logged(run["folder"], TRAIN_LOSS), logged(run["folder"], EVAL_ELBO)
    assert sorted(losses) == list(range(STEPS)) and sorted(elbos) == [2, 4, 6]
    train, evals = run["curves"].points()
    assert [b for b, _ in train] == [k + 1 for k in sorted(losses)]
    assert [v for _, v in train] == pytest.approx([losses[k] for k in sorted(losses)], abs=5e-5)
    assert [b for b, _ in evals] == [2, 4, 6]
    assert [v for _, v in evals] == pytest.approx([elbos[k] for k in (2, 4, 6)], abs=5e-5)
    # ... and the figure draws exactly those points.
    lines = draw(run["curves"], "logged").axes[0].lines
    assert [list(zip(line.get_xdata(), line.get_ydata(), strict=True)) for line in lines] == [train, evals]


@pytest.mark.parametrize("train, evals", [({}, {}), ({1: 5.0, 2: 4.0}, {}), ({}, {2: 4.5})])
def test_a_run_without_losses_or_evaluations_still_draws(tmp_path, train, evals):
    """A run that resumed at its end, or one without eval_loader: the figure holds what there is."""
    lines = draw(Curves(train, evals), "run").axes[0].lines
    drawn = [list(zip(line.get_xdata(), line.get_ydata(), strict=True)) for line in lines]
    assert drawn == [points for points in Curves(train, evals).points() if points]


def test_moving_average_against_a_direct_mean():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    for window in (1, 3, 10):
        direct = [
            sum(values[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(values))
        ]
        assert moving_average(values, window) == pytest.approx(direct)


@pytest.mark.parametrize("backend", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_backend_names_its_extra(tmp_path, monkeypatch, backend):
    real_find_spec = builders.importlib.util.find_spec
    monkeypatch.setattr(
        builders.importlib.util, "find_spec", lambda name: None if name == backend else real_find_spec(name)
    )
    cfg = load_config(QUICKSTART, [f"base_path={tmp_path}", f"loggers.{backend}={{}}"])
    with pytest.raises(ConfigError) as err:
        builders.build_loggers(cfg)
    assert str(err.value) == (
        f"loggers.{backend} needs the {backend} package, which is not installed: pip install "
        f"'composer-dlm[{backend}]' (or remove loggers.{backend})"
    )


def test_logger_keys_are_checked():
    with pytest.raises(ConfigError, match=r"unknown key 'loggers.wandb.projet'; did you mean 'project'\?"):
        load_config(QUICKSTART, ["loggers.wandb={projet: x}"])
    with pytest.raises(ConfigError, match=r"loggers.wandb.mode: 'airplane' is not one of"):
        load_config(QUICKSTART, ["loggers.wandb={mode: airplane}"])
    with pytest.raises(
        ConfigError, match=r"unknown key 'loggers.mlflow.experiment_name'; did you mean 'experiment'"
    ):
        load_config(QUICKSTART, ["loggers.mlflow={experiment_name: x}"])


def test_a_resumed_runs_plot_and_mlflow_run_cover_the_whole_run(tmp_path):
    """The curves travel in the checkpoint: the second start's plot holds the first start's batches too; and the
    second start logs into the first start's MLflow run (loggers.mlflow.resume, default true)."""
    mlruns = tmp_path / "mlruns"

    def train(duration: str) -> Curves:
        overrides = embedded_run_overrides(tmp_path, "resumed", duration) + [
            "callbacks.hf_export=null",
            f"loggers.mlflow={{tracking_uri: '{mlruns.as_uri()}'}}",
        ]
        trainer = builders.build_trainer(load_config(QUICKSTART, overrides))
        trainer.fit()
        trainer.close()
        (recorder,) = [c for c in trainer.state.callbacks if isinstance(c, LossCurves)]
        return recorder.curves

    first = train("4ba")
    second = train("6ba")  # autoresumes from batch 4
    assert sorted(first.train) == [1, 2, 3, 4] and sorted(second.train) == [1, 2, 3, 4, 5, 6]
    assert {b: second.train[b] for b in first.train} == first.train
    assert sorted(second.eval) == [2, 4, 6] and {b: second.eval[b] for b in first.eval} == first.eval
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlruns.as_uri())
    (mlrun,) = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    steps = {h.step for h in client.get_metric_history(mlrun.info.run_id, TRAIN_LOSS)}
    assert steps == set(range(6))  # Composer's steps 0..5: the batches of both starts
