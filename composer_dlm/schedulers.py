"""Warmup-stable-decay, LLaDA's learning-rate schedule, as a Composer scheduler."""

from __future__ import annotations

from composer.core import State, Time


def wsd_multiplier(t: float, *, warmup: float, total: float, decay_fraction: float, alpha_f: float) -> float:
    """LR multiplier at time t: linear warmup 0 -> 1 over ``warmup``, 1 until the last ``decay_fraction`` of
    ``total``, then linear to ``alpha_f`` at ``total``."""
    if warmup > 0 and t < warmup:
        return t / warmup
    decay_start = total * (1.0 - decay_fraction)
    if t < decay_start:
        return 1.0
    frac = min(1.0, (t - decay_start) / max(total - decay_start, 1e-12))
    return 1.0 + frac * (alpha_f - 1.0)


def check_warmup_unit(t_warmup: Time, max_duration: Time) -> None:
    """WSD counts warmup and total in one unit, so a nonzero ``t_warmup`` must use ``max_duration``'s.
    Checked by the config when it is loaded and by the scheduler when it runs."""
    if t_warmup.unit != max_duration.unit and t_warmup.value != 0:
        raise ValueError(
            f"scheduler.t_warmup ({t_warmup}) must use the unit of max_duration ({max_duration})"
        )


class WarmupStableDecayScheduler:
    """Composer scheduler protocol: called with the trainer state, returns the LR multiplier."""

    def __init__(self, t_warmup: str | Time, decay_fraction: float = 0.1, alpha_f: float = 0.0) -> None:
        self.t_warmup = Time.from_timestring(t_warmup) if isinstance(t_warmup, str) else t_warmup
        self.decay_fraction, self.alpha_f = decay_fraction, alpha_f

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        assert state.max_duration is not None, "max_duration is set before schedulers run"
        check_warmup_unit(self.t_warmup, state.max_duration)
        unit = state.max_duration.unit
        return wsd_multiplier(
            float(state.timestamp.get(unit).value),
            warmup=float(self.t_warmup.value),
            total=float(state.max_duration.value) * ssr,
            decay_fraction=self.decay_fraction,
            alpha_f=self.alpha_f,
        )
