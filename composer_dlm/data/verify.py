"""Checking a split's shards against their index before a run reads them.

The converter asks MDSWriter for a hash of every shard (HASH, recorded in index.json). Streaming checks
that hash only for shards it downloads, so local shards are checked here, when the loader is built: the
index must be readable, every shard file present with the size and hash the index records, and the
samples must add up to the manifest's count. A missing, truncated or corrupt file is then one DataError
naming it, before the first batch, instead of an IndexError or out-of-range token ids at batch N.
Hashing runs at several GB/s (xxh3), so checking even a large split costs seconds, not minutes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from composer_dlm.data.errors import DataError
from composer_dlm.data.manifest import INDEX_NAME

HASH = "xxh3_64"
CONVERT_AGAIN = "convert the data again with composer-dlm-convert (or copy the folder again)"


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


def _check_file(folder: Path, info: dict[str, Any]) -> None:
    from streaming.base.hashing import get_hash

    path = folder / info["basename"]
    if not path.is_file():
        raise DataError(f"shard {path} is missing; {CONVERT_AGAIN}")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise DataError(
            f"shard {path} has {size} bytes, its index says {info['bytes']} (truncated or replaced); {CONVERT_AGAIN}"
        )
    expected = (info.get("hashes") or {}).get(HASH)
    if expected is not None and get_hash(HASH, path.read_bytes()) != expected:
        raise DataError(f"shard {path} is corrupt: its {HASH} hash differs from its index's; {CONVERT_AGAIN}")


def verify_split(folder: Path, num_samples: int) -> None:
    """Raise DataError unless every shard of `folder` is whole and the shards hold `num_samples` samples.

    A compressed shard is checked in the form present (Streaming keeps the compressed file when there is
    no remote, and writes the decompressed one beside it on first read).
    """
    index = read_index(folder)
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
        _check_file(folder, zipped if use_zip else raw)
    if total != num_samples:
        raise DataError(
            f"{folder}: the index lists {total} samples, the manifest {num_samples}; the folder mixes "
            f"conversions, {CONVERT_AGAIN}"
        )
