"""Keeps the ComposerModel's training-noise seed in step with the trainer's batch counter."""

from __future__ import annotations

from composer.core import Callback, State
from composer.loggers import Logger


class NoiseClock(Callback):
    """At each batch start, tells the model which batch it is on, so its noise is a function of the timestamp.

    The timestamp is part of every Composer checkpoint, so a resumed run re-draws exactly the noise (and the
    random-length truncations) of the run it continues, on every rank, without extra RNG state.
    """

    def batch_start(self, state: State, logger: Logger) -> None:
        set_step = getattr(state.model, "set_noise_step", None)
        if set_step is not None:
            set_step(int(state.timestamp.batch))
