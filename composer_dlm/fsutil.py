"""Filesystem helpers shared by the writers of whole folders (HF exports, MDS conversions)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_folder(new: Path, target: Path) -> None:
    """Moves the finished folder ``new`` to ``target``. An existing ``target`` is renamed aside first and removed
    only once ``new`` is in place, so a crash leaves the old folder or the new one, never neither."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
