"""The GPU's SM clock and power-cap state, sampled by ``nvidia-smi`` while a timed block runs.

A GPU held at its power limit lowers its SM clock (the software power cap: bit 0x4 of nvidia-smi's
``clocks_event_reasons.active``), so compute-bound work timed back to back runs slower than the same work
after the GPU has idled. The benchmarks record the clock beside the time, so that a figure says in which
regime it was measured.
"""

from __future__ import annotations

import shutil
import subprocess
from types import TracebackType
from typing import Any

import torch

from composer_dlm.benchmarks import repeats

SW_POWER_CAP = 0x4  # clocks_event_reasons bit: the SM clock is lowered to hold the board's power limit
PERIOD_MS = 50


def _device_uuid() -> str | None:
    """The current CUDA device's UUID as nvidia-smi spells it (GPU-...), or None where torch does not say."""
    uuid = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith("GPU-") else f"GPU-{text}"


class ClockSampler:
    """While open, samples the current GPU's SM clock and clock-event reasons every PERIOD_MS; does nothing
    where nvidia-smi or CUDA is missing (``summary()`` is then None)."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, int]] = []  # (SM MHz, clock-event reason bits)
        self._proc: subprocess.Popen[str] | None = None
        self._uuid: str | None = None

    def __enter__(self) -> ClockSampler:
        exe = shutil.which("nvidia-smi")
        if exe is None or not torch.cuda.is_available():
            return self
        self._uuid = _device_uuid()
        query = "--query-gpu=uuid,clocks.sm,clocks_event_reasons.active"
        cmd = [exe, query, "--format=csv,noheader,nounits", "-lms", str(PERIOD_MS)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=30)
        self.samples = parse_samples(out, self._uuid)

    def summary(self) -> dict[str, Any] | None:
        """:func:`summarise` of the samples taken while open."""
        return summarise(self.samples)


def parse_samples(text: str, uuid: str | None) -> list[tuple[int, int]]:
    """(SM MHz, reason bits) of the lines of ``uuid``'s GPU in nvidia-smi's ``uuid, clocks.sm,
    clocks_event_reasons.active`` output; where ``uuid`` matches none and one GPU answered, that GPU's lines.
    Lines that do not parse ("[N/A]") are skipped."""
    rows = [[cell.strip() for cell in line.split(",")] for line in text.splitlines()]
    rows = [r for r in rows if len(r) == 3]
    mine = [r for r in rows if r[0] == uuid] or (rows if len({r[0] for r in rows}) == 1 else [])
    samples = []
    for _, mhz, reasons in mine:
        try:
            samples.append((int(mhz), int(reasons, 16)))
        except ValueError:
            continue
    return samples


def summarise(samples: list[tuple[int, int]]) -> dict[str, Any] | None:
    """The SM clock's samples (median and range) and the share of samples with the power cap active; None
    without samples."""
    if not samples:
        return None
    capped = sum(1 for _, reasons in samples if reasons & SW_POWER_CAP)
    return {"sm_mhz": repeats([mhz for mhz, _ in samples]), "power_capped_share": capped / len(samples)}
