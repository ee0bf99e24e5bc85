"""The run's training curves as a PNG at the end of training: ``{run}/plots/loss.png``.

Train loss per batch (faint, with a moving average over it) and the eval ELBO at each evaluation, both in nats
per token, against the batch. :class:`LossCurves` is a logger destination: it keeps the two series as Composer
logs them, and Composer stores its ``state_dict`` in each checkpoint, so the plot of a resumed run covers the
whole run. Drawn with matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

from composer_dlm.fsutil import staged_file

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TRAIN_LOSS = "loss/train/total"
EVAL_ELBO = "metrics/eval/ELBO"
PLOT_NAME = "loss.png"


@dataclasses.dataclass
class Curves:
    """Batch -> value for the train loss and the eval ELBO, as logged (a later value for a batch replaces it)."""

    train: dict[int, float] = dataclasses.field(default_factory=dict)
    eval: dict[int, float] = dataclasses.field(default_factory=dict)

    def add(self, metrics: Mapping[str, Any], step: int) -> None:
        """Takes the two curves' values out of one ``log_metrics(metrics, step)`` call (other metrics are
        ignored), each at the number of batches trained when it was measured. Composer logs a batch's loss under
        the batch count before it (step 0 for the first batch) and an evaluation under the count after the batch
        it follows, so the loss goes to ``step + 1`` and the ELBO to ``step``, as the console numbers them."""
        if TRAIN_LOSS in metrics:
            self.train[step + 1] = float(metrics[TRAIN_LOSS])
        if EVAL_ELBO in metrics:
            self.eval[step] = float(metrics[EVAL_ELBO])

    def points(self) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """``(train, eval)`` as (batch, value) pairs in batch order: what :func:`draw` plots."""
        return sorted(self.train.items()), sorted(self.eval.items())


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the up to ``window - 1`` values before it."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw(curves: Curves, title: str) -> Figure:
    """The figure: train loss per batch (faint), its moving average, and the eval ELBO (points)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, evals = curves.points()
    fig = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        batches, losses = zip(*train, strict=True)
        window = max(1, len(losses) // 50)
        ax.plot(batches, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss (per batch)")
        smooth = moving_average(list(losses), window)
        if window > 1:
            ax.plot(batches, smooth, color="tab:blue", linewidth=1.8, label=f"train loss (mean of {window})")
        # The per-batch loss (weighted by 1/p_mask) has rare tall spikes: the scale follows the average.
        ax.set_ylim(0, 1.05 * max([*smooth, *(v for _, v in evals)]))
    if evals:
        batches, elbos = zip(*evals, strict=True)
        ax.plot(batches, elbos, "o-", color="tab:orange", linewidth=1.8, label="eval ELBO")
        for batch, elbo in evals:
            ax.annotate(f"{elbo:.2f}", (batch, elbo), textcoords="offset points", xytext=(0, 7), ha="center")
    ax.set_xlabel("batch")
    ax.set_ylabel("nats per token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend(loc="upper right")
    return fig


class LossCurves(LoggerDestination):
    """Keeps :class:`Curves` from every logged metric; at the end of training global rank 0 writes
    ``{folder}/loss.png`` atomically."""

    def __init__(self, folder: str | Path, title: str) -> None:
        self.folder = Path(folder)
        self.title = title
        self.curves = Curves()

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if step is not None:
            self.curves.add(metrics, step)

    def state_dict(self) -> dict[str, Any]:
        # (batch, value) pairs rather than dicts keyed by batch: torch.distributed.checkpoint (sharded
        # checkpoints) turns mapping keys into strings, while a list of number lists is stored as it is.
        train, evals = self.curves.points()
        return {"train": [list(p) for p in train], "eval": [list(p) for p in evals]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def read(pairs: Any) -> dict[int, float]:
            return {int(batch): float(value) for batch, value in pairs or []}

        self.curves = Curves(read(state.get("train")), read(state.get("eval")))

    def fit_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            self.write()

    def write(self) -> Path:
        """Draws the curves to ``{folder}/loss.png`` and returns its path."""
        path = self.folder / PLOT_NAME
        self.folder.mkdir(parents=True, exist_ok=True)
        with staged_file(path) as tmp:
            draw(self.curves, self.title).savefig(tmp, format="png")
        return path
