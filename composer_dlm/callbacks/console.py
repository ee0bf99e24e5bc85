"""What a person watching the run sees: a progress bar and ONE compact line per log interval.

Replaces Composer's ``ConsoleLogger`` (the Trainer gets ``log_to_console=False``), which dumps every metric on
its own line; file loggers (FileLogger, TensorBoard, W&B) still receive every metric. A line looks like

    [batch 40/300] loss 5.812 | eval ELBO 5.903 | 10.2k tok/s | MFU 41.3% | lr 9.6e-04 | ETA 2m05s

(MFU only where Composer's SpeedMonitor can compute it, that is on a GPU it knows; eval ELBO once evaluated).
The bar is drawn on stderr only when stderr is a terminal, so logs redirected to a file hold only the lines.
Global rank 0 prints; the other ranks print nothing.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from composer.core import State, TimeUnit
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

_SECONDS = {"seconds": 1.0, "minutes": 60.0, "hours": 3600.0, "days": 86400.0}


def format_duration(seconds: float) -> str:
    """``125`` -> ``2m05s``; ``3725`` -> ``1h02m``; ``42`` -> ``42s``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_count(value: float) -> str:
    """``10234.5`` -> ``10.2k``; ``1.5e6`` -> ``1.50M``; ``812.3`` -> ``812``."""
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e4:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def compact_line(batch: int, total: int | None, metrics: dict[str, Any], eta_seconds: float | None) -> str:
    """The one line for ``batch`` from the latest logged metrics (keys as Composer's callbacks name them)."""
    parts = [f"[batch {batch}/{total}]" if total else f"[batch {batch}]"]
    fields = []
    if "loss/train/total" in metrics:
        fields.append(f"loss {float(metrics['loss/train/total']):.3f}")
    if "metrics/eval/ELBO" in metrics:
        fields.append(f"eval ELBO {float(metrics['metrics/eval/ELBO']):.3f}")
    if "throughput/tokens_per_sec" in metrics:
        fields.append(f"{format_count(float(metrics['throughput/tokens_per_sec']))} tok/s")
    elif "throughput/samples_per_sec" in metrics:
        fields.append(f"{float(metrics['throughput/samples_per_sec']):.1f} samples/s")
    if "throughput/device/mfu" in metrics:
        fields.append(f"MFU {100 * float(metrics['throughput/device/mfu']):.1f}%")
    lr = next((v for k, v in metrics.items() if k.startswith("lr-")), None)
    if lr is not None:
        fields.append(f"lr {float(lr):.1e}")
    if eta_seconds is not None:
        fields.append(f"ETA {format_duration(eta_seconds)}")
    return " ".join(parts) + (" " + " | ".join(fields) if fields else "")


class ConsoleProgress(LoggerDestination):
    """Progress bar plus one :func:`compact_line` every ``interval`` batches (and at the end of training)."""

    def __init__(self, interval: int, *, progress_bar: bool = True, stream: TextIO | None = None) -> None:
        self.interval = interval
        self.progress_bar = progress_bar
        self.stream = stream  # None: sys.stdout at the time of printing (pytest's capsys swaps it)
        self.metrics: dict[str, Any] = {}
        self.eta_unit = "hours"  # RuntimeEstimator's default, replaced by what it logs at init
        self.last_printed = -1
        self._bar: Any = None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        del step
        self.metrics.update(metrics)

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        unit = hyperparameters.get("time/remaining_estimate_unit")
        if unit in _SECONDS:
            self.eta_unit = unit

    def fit_start(self, state: State, logger: Logger) -> None:
        if not self.progress_bar or dist.get_global_rank() != 0 or not sys.stderr.isatty():
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=_total_batches(state),
            initial=int(state.timestamp.batch),
            unit="ba",
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        # Here rather than at batch_end: loggers run before callbacks at each event, so only now has every
        # callback (speed, learning rate, time estimate) logged this batch's metrics.
        if int(state.timestamp.batch) % self.interval == 0:
            self._print_line(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) != self.last_printed:
            self._print_line(state)
        self._close_bar()

    def post_close(self) -> None:
        self._close_bar()

    def _print_line(self, state: State) -> None:
        batch = int(state.timestamp.batch)
        self.last_printed = batch
        if dist.get_global_rank() != 0:
            return
        eta = self.metrics.get("time/remaining_estimate")
        eta_seconds = float(eta) * _SECONDS[self.eta_unit] if eta is not None else None
        line = compact_line(batch, _total_batches(state), self.metrics, eta_seconds)
        stream = self.stream or sys.stdout
        if self._bar is not None:
            self._bar.write(line, file=stream)
        else:
            print(line, file=stream, flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _total_batches(state: State) -> int | None:
    """``max_duration`` in batches when it is given in batches or epochs of a sized loader, else None."""
    duration = state.max_duration
    if duration is None:
        return None
    if duration.unit == TimeUnit.BATCH:
        return int(duration.value)
    if duration.unit == TimeUnit.EPOCH and state.dataloader_len is not None:
        return int(duration.value) * int(state.dataloader_len)
    return None
