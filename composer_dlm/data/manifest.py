"""The manifest written next to each split's shards, and the checks a loader makes against it.

`<split>/manifest.json` records the mode, the sequence length, the tokenizer (name, vocabulary
fingerprint, special ids) and the counts of a conversion. A loader refuses shards whose mode,
sequence length or tokenizer differ from the run's, naming the folder and the fix.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from composer_dlm.data.errors import DataError
from composer_dlm.data.tokenizer import mask_token_id, tokenizer_fingerprint

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.json"
FORMAT = "composer_dlm-mds-1"


def tokenizer_info(tokenizer: Any, name: str) -> dict[str, Any]:
    """What the manifest records about a tokenizer."""
    try:
        mask_id: int | None = mask_token_id(tokenizer)
    except DataError:
        mask_id = None
    return {
        "name": name,
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "mask_token_id": mask_id,
    }


def build_manifest(
    *,
    mode: str,
    split: str,
    seq_len: int,
    columns: dict[str, str],
    compression: str | None,
    tokenizer: dict[str, Any],
    counts: dict[str, int],
    inputs: list[str],
    options: dict[str, Any],
    hashes: list[str] | None = None,
) -> dict[str, Any]:
    """The manifest of one split; `tokenizer` comes from tokenizer_info, `counts` must hold 'samples';
    `hashes` names the hash algorithms whose values index.json holds for every shard."""
    return {
        "format": FORMAT,
        "mode": mode,
        "split": split,
        "seq_len": seq_len,
        "columns": columns,
        "compression": compression,
        "tokenizer": tokenizer,
        "counts": counts,
        "inputs": inputs,
        "options": options,
        "hashes": hashes or [],
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST_NAME).write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def _parse(path: Path, label: str) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{label}: unreadable manifest ({e}); convert the data again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{label}: not a composer_dlm manifest of format {FORMAT!r}; convert the data again")
    return manifest


def locate_manifest(
    local: str | None, remote: str | None, split: str | None, *, download_timeout: float = 60.0
) -> dict[str, Any]:
    """Read a split's manifest: from the local folder when it is there, else from `remote`.

    Raises DataError for a missing or empty local folder (with no remote) or a missing manifest.
    """
    if local is not None:
        path = Path(local).expanduser() / (split or "") / MANIFEST_NAME
        if path.is_file():
            return _parse(path, str(path))
        if remote is None:
            _check_local_folder(Path(local).expanduser(), split)
            raise DataError(
                f"shard folder {path.parent} has MDS shards but no {MANIFEST_NAME}, so its tokenizer and "
                "sequence length are unknown; convert the data with composer-dlm-convert"
            )
    assert remote is not None
    url = "/".join([remote.rstrip("/"), *([split] if split else []), MANIFEST_NAME])
    from streaming.base.storage import CloudDownloader

    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, MANIFEST_NAME)
        try:
            CloudDownloader.direct_download(url, target, download_timeout)
        except Exception as e:  # the cloud clients raise their own error types
            raise DataError(
                f"could not fetch {url} ({e}); check the remote path and split, and that the data was "
                "converted with composer-dlm-convert"
            ) from e
        return _parse(Path(target), url)


def _check_local_folder(local: Path, split: str | None) -> None:
    """Name what is wrong with a local shard folder that has no manifest for `split`.

    The convention: convert_to_mds.py --out DIR writes DIR/train and DIR/val; a loader reads
    `local: DIR` with `split: train` (or val).
    """
    folder = local / (split or "")
    if (folder / INDEX_NAME).is_file():
        return
    fix = f"convert data there with `composer-dlm-convert INPUT --out {local} ...` or fix the loader's local"
    if not local.is_dir():
        raise DataError(f"no shard folder {local}: {fix}")
    if split and (local / INDEX_NAME).is_file():
        raise DataError(
            f"{local} is itself a split folder (shards and {INDEX_NAME}) and has no {split!r} inside; set the "
            f"loader's local to {local.parent}, the folder composer-dlm-convert --out wrote (its split {split!r} "
            f"is then read from {local.parent / split})"
        )
    splits = sorted(p.name for p in local.iterdir() if (p / INDEX_NAME).is_file())
    if split == "val" and splits:
        raise DataError(
            f"no split 'val' in {local} (it has {', '.join(splits)}); convert again with --val-fraction "
            "(e.g. 0.01) to hold some data out for evaluation, or set eval_loader.split to one of them"
        )
    if split and splits:
        raise DataError(
            f"no split {split!r} in {local} (it has {', '.join(splits)}); set the loader's split to one of them"
        )
    if not split and splits:
        raise DataError(
            f"{local} holds splits ({', '.join(splits)}), not shards; set the loader's split to one of them"
        )
    raise DataError(f"shard folder {folder} is empty or holds no MDS index ({INDEX_NAME}): {fix}")


def check_manifest(
    manifest: dict[str, Any], *, where: str, mode: str, max_seq_len: int, tokenizer: Any
) -> None:
    """Raise DataError unless the shards at `where` fit this run's mode, sequence length and tokenizer."""
    fix = "reconvert the data to match, or point the loader at shards made for this run"
    if manifest["mode"] != mode:
        raise DataError(f"{where}: shards are for {manifest['mode']!r}, the run wants {mode!r}; {fix}")
    seq_len = int(manifest["seq_len"])
    if mode == "pretrain" and seq_len != max_seq_len:
        raise DataError(
            f"{where}: shards hold sequences of {seq_len} tokens, the run's max_seq_len is {max_seq_len}; "
            f"reconvert with --seq-len {max_seq_len} or set max_seq_len to {seq_len}"
        )
    if mode == "sft" and seq_len > max_seq_len:
        raise DataError(
            f"{where}: SFT examples are up to {seq_len} tokens, longer than the run's max_seq_len "
            f"{max_seq_len}; reconvert with --seq-len {max_seq_len} or raise max_seq_len"
        )
    theirs = manifest["tokenizer"]
    # Only the fingerprint, not all of tokenizer_info: each look at a large vocabulary (LLaDA's 126k) takes
    # about half a second, and this runs for every loader.
    fingerprint = tokenizer_fingerprint(tokenizer)
    if theirs["fingerprint"] != fingerprint:
        name = getattr(tokenizer, "name_or_path", "?")
        raise DataError(
            f"{where}: shards were tokenised with {theirs['name']!r} (vocab {theirs['vocab_size']}, fingerprint "
            f"{theirs['fingerprint']}), the run uses {name!r} (vocab {len(tokenizer)}, fingerprint "
            f"{fingerprint}); reconvert with the run's tokenizer or set the run's tokenizer to theirs"
        )
    if int(manifest["counts"]["samples"]) == 0:
        raise DataError(f"{where}: the shards hold no samples; convert more data")
