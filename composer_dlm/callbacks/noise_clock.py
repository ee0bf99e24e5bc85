"""Keeps the ComposerModel's training-noise seed in step with the trainer's batch counter."""

from __future__ import annotations

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from composer_dlm.parallel import composer_llada


class NoiseClock(Callback):
    """Before each batch, tells the model which batch it is on and where this process's rows start in the
    global batch, so each sequence's noise is a function of the timestamp and its place in the global batch.

    The timestamp is part of every Composer checkpoint, so a resumed run re-draws exactly the noise (and the
    random-length truncations) of the run it continues, on every rank, without extra RNG state. It runs at
    ``BEFORE_TRAIN_BATCH``, which Composer repeats when an out-of-memory retry splits the batch again, so the
    retry draws the same noise. The model is found through DDP/FSDP wrappers; a model that is not a
    :class:`ComposerLLaDA` is a TypeError at the first batch rather than a run with free-running noise.
    """

    def before_train_batch(self, state: State, logger: Logger) -> None:
        # Rows per process: the loader's batch size (a short last batch keeps the full batches' numbering), else
        # the batch itself (at BEFORE_TRAIN_BATCH still this process's whole batch, not yet split).
        rows = getattr(state.train_dataloader, "batch_size", None)
        if not isinstance(rows, int):
            rows = int(state.batch["input_ids"].shape[0])
        composer_llada(state.model).set_noise_step(int(state.timestamp.batch), dist.get_global_rank() * rows)
