"""Checking a split's shards against their index before a run reads them.

The converter asks MDSWriter for a hash of every shard (HASH, recorded in index.json). Streaming checks
that hash only for shards it downloads, so local shards are checked here, when the loader is built. How
much is checked is the loader's `verify`:

- `quick` (the default): the index must be readable, every shard present with the size the index records,
  and the samples must add up to the manifest's count; a shard's content hash is checked the first time it
  is seen and remembered in a stamp (size, modification time, inode and hash per shard), so later starts read no
  shard bytes. A shard rewritten or copied since (new size, modification time or inode) is hashed again.
- `full`: every shard's content hashed at every start (also catches damage in place that kept the size and
  the modification time, such as a failing disk).
- `off`: nothing (the manifest's checks against the run still apply).

The stamp is `.verified.json` beside the shards; where that folder is read-only it goes to the user's cache
(`$XDG_CACHE_HOME/composer_dlm/verified/`, keyed by the folder's path). Under several processes the check runs
on local rank 0 of each node while the node's other ranks wait, and a failure is raised on every rank.

A missing, truncated or corrupt file is then one DataError naming it, before the first batch, instead of an
IndexError or out-of-range token ids at batch N.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from composer_dlm.data.errors import DataError
from composer_dlm.data.manifest import INDEX_NAME
from composer_dlm.fsutil import write_text_atomic

HASH = "xxh3_64"
VERIFY_MODES = ("quick", "full", "off")
STAMP_NAME = ".verified.json"
CONVERT_AGAIN = "convert the data again with composer-dlm-convert (or copy the folder again)"

Stamp = dict[str, list[Any]]  # shard basename -> [size, mtime_ns, inode, hash]


def read_index(folder: Path) -> dict[str, Any]:
    """The parsed index.json of a split folder, or DataError naming it."""
    path = folder / INDEX_NAME
    if not path.is_file():
        raise DataError(f"{path} is missing, so the shards there cannot be read; {CONVERT_AGAIN}")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} is corrupt ({type(e).__name__}: {e}); {CONVERT_AGAIN}") from e
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise DataError(f"{path} is corrupt (no list of shards); {CONVERT_AGAIN}")
    return index


def shard_hash(path: Path) -> str:
    """The HASH of a shard file's bytes: the only place verification reads shard contents."""
    from streaming.base.hashing import get_hash

    return get_hash(HASH, path.read_bytes())


def stamp_paths(folder: Path) -> list[Path]:
    """Where a split's stamp may be: beside its shards, then in the user's cache (read-only shard folders)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "composer_dlm" / "verified"
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:20]
    return [folder / STAMP_NAME, cache / f"{key}.json"]


def read_stamp(folder: Path) -> Stamp:
    """The shards of `folder` whose hash was checked, from every stamp location (an unreadable stamp is none)."""
    stamp: Stamp = {}
    for path in reversed(stamp_paths(folder)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("hash") == HASH and isinstance(data.get("shards"), dict):
            stamp.update(data["shards"])
    return stamp


def write_stamp(folder: Path, stamp: Stamp) -> None:
    """Remembers the checked shards beside them, else in the cache; silently nowhere if neither is writable."""
    text = json.dumps({"hash": HASH, "shards": stamp}, separators=(",", ":"))
    for path in stamp_paths(folder):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)
            return
        except OSError:
            continue


def _check_file(folder: Path, info: dict[str, Any], *, full: bool, stamp: Stamp) -> bool:
    """Checks one shard file; returns whether its hash was read (and so `stamp` updated)."""
    path = folder / info["basename"]
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"shard {path} is missing; {CONVERT_AGAIN}") from None
    if st.st_size != info["bytes"]:
        raise DataError(
            f"shard {path} has {st.st_size} bytes, its index says {info['bytes']} (truncated or replaced); "
            f"{CONVERT_AGAIN}"
        )
    expected = (info.get("hashes") or {}).get(HASH)
    seen = [st.st_size, st.st_mtime_ns, st.st_ino, expected]
    if expected is None or (not full and stamp.get(info["basename"]) == seen):
        return False
    if shard_hash(path) != expected:
        raise DataError(f"shard {path} is corrupt: its {HASH} hash differs from its index's; {CONVERT_AGAIN}")
    stamp[info["basename"]] = seen
    return True


def verify_split(folder: Path, num_samples: int, mode: str = "quick") -> None:
    """Raise DataError unless the shards of `folder` pass the `mode` check (see the module's docstring) and
    hold `num_samples` samples.

    A compressed shard is checked in the form present (Streaming keeps the compressed file when there is
    no remote, and writes the decompressed one beside it on first read).
    """
    assert mode in VERIFY_MODES, mode
    if mode == "off":
        return
    index = read_index(folder)
    stamp = read_stamp(folder)
    hashed = False
    total = 0
    for shard in index["shards"]:
        try:
            raw, zipped = shard["raw_data"], shard.get("zip_data")
            total += int(shard["samples"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"{folder / INDEX_NAME} is corrupt (a shard entry lacks {e}); {CONVERT_AGAIN}"
            ) from e
        use_zip = zipped is not None and (folder / zipped["basename"]).is_file()
        hashed |= _check_file(folder, zipped if use_zip else raw, full=mode == "full", stamp=stamp)
    if total != num_samples:
        raise DataError(
            f"{folder}: the index lists {total} samples, the manifest {num_samples}; the folder mixes "
            f"conversions, {CONVERT_AGAIN}"
        )
    if hashed:
        write_stamp(folder, stamp)


def once_per_node(check: Callable[[], None]) -> None:
    """Runs `check` on local rank 0 of each node while the node's other ranks wait; a DataError (or any other
    failure, as a DataError) on any node is raised on every rank, so all leave together with the same line."""
    from composer.utils import dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        check()
        return
    error = None
    if dist.get_local_rank() == 0:
        try:
            check()
        except DataError as e:
            error = str(e)
        except Exception as e:  # not to leave the other ranks waiting in the gather below
            error = f"checking shards failed: {type(e).__name__}: {e}"
    errors = dist.all_gather_object(error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise DataError(first)
