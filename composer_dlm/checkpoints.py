"""Crash safety for Composer's checkpoint folder, checked before every (re)start.

Composer writes a checkpoint in place and then re-points ``latest-rank0.pt`` by removing the old symlink and
creating a new one. A process killed during the write leaves a truncated file; one killed between the
remove and the create leaves no ``latest`` at all, and autoresume would silently start from scratch.
:func:`repair_checkpoint_folder` finds the newest complete checkpoint, moves incomplete ones aside
(``*.incomplete``) and points ``latest`` at the complete one atomically (new symlink, then rename).

Completeness is judged without reading the whole file (a restart of a large run must not wait on it): at each
save :class:`CheckpointManifests` writes ``NAME.manifest.json`` beside the checkpoint, with its size, the names,
offsets and sizes of its zip members and a hash of its pickle (``data.pkl``, the small metadata); at start the same
listing is taken again (a ``stat``, the zip central directory at the file's end, the pickle) and compared. A
checkpoint without a manifest (older runs, or a kill between the save and the manifest) is judged by the listing
alone: a readable central directory with a pickle, every member inside the file. Neither reads the tensors, so a
byte flipped inside them is not seen here (nor is it by Composer's load).

Sharded checkpoints (FSDP ``state_dict_type: sharded``) are folders of ``.distcp`` shards, not zip archives; a
``latest`` pointing at a folder is left as it is, since this module cannot judge those.

Also here, for the same folder: retention that counts every checkpoint on disk (:func:`prune_checkpoints`,
:class:`CheckpointRetention`; Composer's ``save_num_checkpoints_to_keep`` only counts the saves of the current
process, so each restart used to leave the previous process's checkpoints behind), and the start-up check that
a checkpoint about to be resumed fits the run as configured now (:func:`check_resume`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from composer_dlm.fsutil import write_text_atomic

_CKPT_NAME = re.compile(r"^ep(\d+)-ba(\d+)-rank(\d+)\.pt$")
_SHARDED_NAME = re.compile(r"^ep(\d+)-ba(\d+)$")  # a sharded checkpoint: a folder of .distcp files
MANIFEST_SUFFIX = ".manifest.json"


class ResumeMismatchError(ValueError):
    """The checkpoint to resume does not fit the run as configured now; the message says what differs."""


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


def manifest_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + MANIFEST_SUFFIX)


def checkpoint_listing(path: Path) -> dict[str, Any] | None:
    """What a manifest records of the checkpoint file ``path``, taken without reading its tensors: its size, each
    zip member's offset and size (from the central directory at the end of the file) and the SHA-256 of its
    pickle. None when the file is not a whole torch zip archive (a truncated one has no central directory)."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            members = {i.filename: [i.header_offset, i.compress_size] for i in archive.infolist()}
            pickle = next((name for name in members if name.endswith("data.pkl")), None)
            if pickle is None or any(offset + length > size for offset, length in members.values()):
                return None
            digest = hashlib.sha256(archive.read(pickle)).hexdigest()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None
    return {"bytes": size, "members": members, "pickle_sha256": digest}


def write_manifest(checkpoint: Path) -> None:
    """Writes the manifest of a just-saved checkpoint (atomically: a reader sees none or the whole)."""
    listing = checkpoint_listing(checkpoint)
    if listing is not None:
        write_text_atomic(manifest_path(checkpoint), json.dumps(listing, sort_keys=True))


def is_complete_checkpoint(path: Path) -> bool:
    """True when ``path`` is a whole checkpoint: as its manifest lists it, or (no manifest) a readable torch zip
    archive with every member inside the file. O(members), whatever the checkpoint's size."""
    listing = checkpoint_listing(path)
    if listing is None:
        return False
    try:
        recorded = json.loads(manifest_path(path).read_text())
    except (
        OSError,
        ValueError,
    ):  # none (older runs, a kill before it was written), or torn: the listing alone
        return True
    return bool(recorded == listing)


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
    candidates = [(batch, path) for batch, path in saved_checkpoints(folder, rank) if path.is_file()]
    quarantined = []
    good: Path | None = None
    for _, path in candidates:
        if is_complete_checkpoint(path):
            good = path
            break
        aside = path.with_name(path.name + ".incomplete")
        os.replace(path, aside)
        manifest_path(path).unlink(missing_ok=True)
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


def saved_checkpoints(folder: Path, rank: int = 0) -> list[tuple[int, Path]]:
    """(batch, path) of the checkpoints in ``folder``, newest first: rank ``rank``'s files and sharded folders."""
    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.is_symlink():
            continue
        file = _CKPT_NAME.match(path.name)
        if file and int(file.group(3)) == rank and path.is_file():
            found.append((int(file.group(2)), path))
        sharded = _SHARDED_NAME.match(path.name)
        if sharded and path.is_dir():
            found.append((int(sharded.group(2)), path))
    return sorted(found, reverse=True)


def prune_checkpoints(folder: str | os.PathLike[str], keep: int, rank: int = 0) -> list[Path]:
    """Deletes all but the ``keep`` newest checkpoints in ``folder`` (by batch), never the one ``latest``
    points to; returns what it deleted. ``keep < 1`` deletes nothing (Composer's -1: keep all)."""
    folder = Path(folder)
    if keep < 1:
        return []
    latest = folder / f"latest-rank{rank}.pt"
    protected = latest.resolve() if latest.is_symlink() else None
    deleted = []
    for _, path in saved_checkpoints(folder, rank)[keep:]:
        if path.resolve() == protected:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
            manifest_path(path).unlink(missing_ok=True)
        deleted.append(path)
    return deleted


class _AfterSave(Callback):
    """Runs :meth:`after_save` on global rank 0 after each possible save. Must run after Composer's
    ``CheckpointSaver`` at each event: append it to ``trainer.state.callbacks`` once the Trainer is built."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def after_save(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        if dist.get_global_rank() == 0:
            self.after_save()

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._run()

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._run()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._run()


class CheckpointManifests(_AfterSave):
    """Writes the manifest of rank 0's newest checkpoint file after each save (see the module's docstring); runs
    before :class:`CheckpointRetention`."""

    def after_save(self) -> None:
        saved = saved_checkpoints(self.folder)
        if saved and saved[0][1].is_file() and not manifest_path(saved[0][1]).exists():
            write_manifest(saved[0][1])


class CheckpointRetention(_AfterSave):
    """Keeps the ``keep`` newest checkpoints of the folder after each save, counting those of earlier processes.

    Composer's own rotation must be off (``save_num_checkpoints_to_keep=-1``): Composer deletes its own saves
    without checking they still exist.
    """

    def __init__(self, folder: str | os.PathLike[str], keep: int) -> None:
        super().__init__(folder)
        self.keep = keep

    def after_save(self) -> None:
        prune_checkpoints(self.folder, self.keep)


class RunIdentity(Callback):
    """Stores what a checkpoint's numbers mean beyond its tensors (the tokenizer) in the checkpoint itself:
    Composer saves each callback's ``state_dict`` under ``state['callbacks'][class name]``."""

    def __init__(self, tokenizer_name: str, tokenizer_fingerprint: str) -> None:
        self.identity = {"tokenizer": tokenizer_name, "tokenizer_fingerprint": tokenizer_fingerprint}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.identity)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state  # compared before loading, by check_resume


def check_resume(
    path: str | os.PathLike[str],
    *,
    model_state: Mapping[str, torch.Tensor],
    frozen: set[str],
    identity: RunIdentity,
    dataset_samples: int | None,
    world_size: int,
    weights_only: bool,
    fix_model: str,
    fix_data: str,
) -> None:
    """Raises :class:`ResumeMismatchError` when the checkpoint at ``path`` does not fit the run as built now:
    model tensors of another name, shape or dtype (``frozen`` names may be absent: adapters save only what
    trains), another tokenizer, or (unless ``weights_only``) a data position past the dataset's end.
    ``fix_model`` (model or tokenizer differ) and ``fix_data`` end the messages: what the user can do. The
    file is read with ``mmap``: tensors are not loaded.

    Only call it on trusted paths: reading the checkpoint unpickles it, as Composer's own load does.
    """
    try:
        raw = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # an unreadable file is Composer's to report (and repair's to move aside)
        return
    state = raw.get("state", {}) if isinstance(raw, Mapping) else {}
    saved = state.get("model") if isinstance(state, Mapping) else None
    if not isinstance(saved, Mapping):
        return
    where = f"the checkpoint {path}"
    differ = []
    for name, tensor in model_state.items():
        theirs = saved.get(name)
        if theirs is None:
            if name not in frozen:
                differ.append(f"{name} is missing")
        elif tuple(theirs.shape) != tuple(tensor.shape) or theirs.dtype != tensor.dtype:
            differ.append(f"{name} is {_describe(theirs)} there, {_describe(tensor)} here")
    differ += [f"{name} is not in this model" for name in saved if name not in model_state]
    if differ:
        more = f" (and {len(differ) - 3} more tensors)" if len(differ) > 3 else ""
        raise ResumeMismatchError(
            f"{where} does not fit the model as configured: {'; '.join(differ[:3])}{more}. Undo the change to "
            f"the model, or {fix_model}"
        )
    callbacks = state.get("callbacks") or {}
    theirs_id = callbacks.get(type(identity).__qualname__) if isinstance(callbacks, Mapping) else None
    ours = identity.identity
    if (
        isinstance(theirs_id, Mapping)
        and theirs_id.get("tokenizer_fingerprint") != ours["tokenizer_fingerprint"]
    ):
        raise ResumeMismatchError(
            f"{where} was trained with the tokenizer {theirs_id.get('tokenizer')!r} (fingerprint "
            f"{theirs_id.get('tokenizer_fingerprint')}), this run uses {ours['tokenizer']!r} (fingerprint "
            f"{ours['tokenizer_fingerprint']}); set tokenizer.name back, or {fix_model}"
        )
    data = state.get("dataset_state") or {}
    train = data.get("train") if isinstance(data, Mapping) else None
    if weights_only or dataset_samples is None or not isinstance(train, Mapping):
        return
    position = int(train.get("sample_in_epoch", 0))
    # Streaming pads an epoch up to a multiple of the world size and refuses positions beyond that.
    padded = dataset_samples + world_size - dataset_samples % world_size
    if position > padded:
        raise ResumeMismatchError(
            f"{where} is {position} samples into its epoch but the training data now has {dataset_samples} "
            f"samples per epoch (did it shrink?); give the run its data back, or {fix_data}"
        )


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
