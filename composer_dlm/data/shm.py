"""Removing the shared memory that killed Streaming runs leave behind, without touching live runs'.

StreamingDataset keeps its state in named shared-memory blocks (`NNNNNN_<name>` in /dev/shm on Linux)
and a killed run never unlinks them. Streaming's own cleaner unlinks every such block, live or not,
and walks prefixes from 0 only up to the first free one. Here a block counts as stale when no process
maps it (every live dataset, and each of its DataLoader workers, keeps its blocks mapped; a dead
process maps nothing), read from /proc/*/maps, so cleaning is safe at every loader build, next to
other live loaders of this process or of other jobs on the node. Where /dev/shm or /proc are missing
(not Linux) Streaming's cleaner is used instead, and only while this process has no dataset of ours.
"""

from __future__ import annotations

import contextlib
import gc
import re
import weakref
from pathlib import Path
from typing import Any

SHM_DIR = Path("/dev/shm")
PROC_DIR = Path("/proc")
_BLOCK = re.compile(r"\d{6}_(\w+)")

_live: weakref.WeakSet[Any] = weakref.WeakSet()


def register_live_dataset(dataset: Any) -> None:
    """Track a dataset of ours (for the non-Linux fallback, which must not run while one is alive)."""
    _live.add(dataset)


def streaming_blocks() -> list[str]:
    """Names of Streaming's shared-memory blocks in /dev/shm."""
    from streaming.base.constant import SHM_TO_CLEAN

    names = []
    for entry in SHM_DIR.iterdir():
        match = _BLOCK.fullmatch(entry.name)
        if match and match.group(1) in SHM_TO_CLEAN:
            names.append(entry.name)
    return names


def mapped_shm_names() -> set[str]:
    """Names of /dev/shm files mapped by any process whose memory map we may read."""
    prefix = f"{SHM_DIR}/"
    mapped = set()
    for maps in PROC_DIR.glob("[0-9]*/maps"):
        try:
            lines = maps.read_text().splitlines()
        except OSError:  # the process ended, or belongs to another user (whose blocks we cannot unlink)
            continue
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(prefix):
                mapped.add(fields[5][len(prefix) :].removesuffix(" (deleted)"))
    return mapped


def clean_stale_shared_memory() -> list[str]:
    """Unlink Streaming blocks that no process maps; return their names.

    Local rank 0 cleans while the node's other ranks wait (as Streaming's cleaner does), so no rank
    is between creating a block and mapping it meanwhile. Falls back to Streaming's cleaner where
    /dev/shm or /proc are missing (see the module docstring).
    """
    if not (SHM_DIR.is_dir() and (PROC_DIR / "self" / "maps").is_file()):
        return _fallback()
    import torch.distributed as dist
    from streaming.base.distributed import get_local_rank, maybe_init_dist

    destroy_dist = maybe_init_dist()  # a process group from the launcher's env if none exists yet
    try:
        removed = _sweep() if get_local_rank() == 0 else []
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    finally:
        if destroy_dist:
            dist.destroy_process_group()
    return removed


def _sweep() -> list[str]:
    blocks = streaming_blocks()
    if not blocks:
        return []
    mapped = mapped_shm_names()
    removed = []
    for name in blocks:
        if name not in mapped:
            with contextlib.suppress(FileNotFoundError, PermissionError):
                (SHM_DIR / name).unlink()
                removed.append(name)
    return removed


def _fallback() -> list[str]:
    if _live:
        gc.collect()  # datasets of loaders that were dropped may still wait for collection
    if _live:
        return []
    from streaming.base.util import clean_stale_shared_memory as streaming_clean

    streaming_clean()
    return ["(all, by streaming.base.util.clean_stale_shared_memory)"]
