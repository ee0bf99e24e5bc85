"""Crash safety for Composer's checkpoint folder, checked before every (re)start.

Composer writes a checkpoint in place and then re-points ``latest-rank0.pt`` by removing the old symlink and
creating a new one. A process killed during the write leaves a truncated file; one killed between the
remove and the create leaves no ``latest`` at all, and autoresume would silently start from scratch.
:func:`repair_checkpoint_folder` finds the newest complete checkpoint, moves incomplete ones aside
(``*.incomplete``) and points ``latest`` at the complete one atomically (new symlink, then rename).

Sharded checkpoints (FSDP ``state_dict_type: sharded``) are folders of ``.distcp`` shards, not zip archives; a
``latest`` pointing at a folder is left as it is, since this module cannot judge those.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

_CKPT_NAME = re.compile(r"^ep(\d+)-ba(\d+)-rank(\d+)\.pt$")


@dataclass
class RepairReport:
    latest: Path | None
    quarantined: list[Path]
    relinked: bool

    def message(self) -> str | None:
        if not self.quarantined and not self.relinked:
            return None
        parts = []
        if self.quarantined:
            parts.append(
                "incomplete checkpoint(s) moved aside: " + ", ".join(p.name for p in self.quarantined)
            )
        if self.latest is not None:
            parts.append(f"resuming from the last complete checkpoint {self.latest.name}")
        else:
            parts.append("no complete checkpoint left; starting from scratch")
        return "; ".join(parts)


def is_complete_checkpoint(path: Path) -> bool:
    """True when ``path`` is a readable torch zip archive (a truncated one has no central directory)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            return any(n.endswith("data.pkl") for n in names) and archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def repair_checkpoint_folder(folder: str | os.PathLike[str], rank: int = 0) -> RepairReport:
    """Makes ``{folder}/latest-rank{rank}.pt`` point at the newest complete checkpoint of that rank, if any.

    Returns what it did; the caller reports :meth:`RepairReport.message` (once, where its users will see it).
    """
    folder = Path(folder)
    latest = folder / f"latest-rank{rank}.pt"
    if not folder.is_dir() or latest.is_dir():
        # No checkpoints yet, or a sharded one: without this check a sharded run's `latest` would be deleted as
        # "no complete checkpoint" (it has no single-file checkpoints) and every restart would start over.
        return RepairReport(None, [], False)
    candidates = []
    for path in folder.iterdir():
        match = _CKPT_NAME.match(path.name)
        if match and int(match.group(3)) == rank and path.is_file() and not path.is_symlink():
            candidates.append((int(match.group(2)), path))
    candidates.sort(reverse=True)
    quarantined = []
    good: Path | None = None
    for _, path in candidates:
        if is_complete_checkpoint(path):
            good = path
            break
        aside = path.with_name(path.name + ".incomplete")
        os.replace(path, aside)
        quarantined.append(aside)
    current = latest.resolve() if latest.is_symlink() or latest.exists() else None
    relinked = False
    if good is not None and current != good.resolve():
        tmp = folder / f".{latest.name}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(good.name, tmp)
        os.replace(tmp, latest)
        relinked = True
    elif good is None and (latest.is_symlink() or latest.exists()):
        latest.unlink()
        relinked = True
    return RepairReport(good, quarantined, relinked)
