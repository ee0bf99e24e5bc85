"""Filesystem helpers shared by the writers of whole folders (HF exports, MDS conversions, the embedded cache)
and of single files (the run's config.yaml, generated YAMLs)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def replace_folder(new: Path, target: Path) -> None:
    """Moves the finished folder ``new`` to ``target``. An existing ``target`` is renamed aside first and removed
    only once ``new`` is in place, so a crash leaves the old folder or the new one, never neither."""
    if not target.exists():
        os.replace(new, target)
        return
    old = _aside(target)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def remove_folder(target: Path) -> None:
    """Removes the folder ``target`` after renaming it aside, so that no reader finds it half-deleted."""
    old = _aside(target)
    os.replace(target, old)
    shutil.rmtree(old, ignore_errors=True)


def _aside(target: Path) -> Path:
    """The hidden sibling name a folder is moved to before it is deleted."""
    return target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"


STAGING_MARK = ".tmp-"
"""What a staging sibling's name has between the target's name and the writer's PID."""


def _staging_sibling(target: Path) -> Path:
    """The hidden sibling ``.NAME.tmp-PID-RAND`` that a new ``target`` is written into before it is renamed
    over it (the name :func:`remove_stale_staging` reads the writer's PID from)."""
    return target.with_name(f".{target.name}{STAGING_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yields a hidden sibling of ``path`` to write the new file into; a normal exit renames it over ``path``
    (readers see the old file or the new one, never a part), any exception removes it."""
    tmp = _staging_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (see :func:`staged_file`)."""
    with staged_file(path) as tmp:
        tmp.write_text(text)


def remove_stale_staging(target: Path) -> list[Path]:
    """Removes the hidden staging folders of ``target`` (see :func:`staged_folder`) whose writing process is gone,
    as a hard kill leaves them; those of live processes stay. Returns the removed paths."""
    removed = []
    for tmp in target.parent.glob(f".{target.name}{STAGING_MARK}*"):
        pid = tmp.name[len(f".{target.name}{STAGING_MARK}") :].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (someone else's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yields a fresh hidden sibling of ``target`` (``.NAME.tmp-PID-RAND``, not yet created) to write the new
    folder into. A normal exit moves it to ``target`` with :func:`replace_folder`; any exception (interrupts
    included) removes it, so ``target`` is never half-written. A hard kill leaves only the hidden folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging_sibling(target)
    try:
        yield tmp
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
