"""Where a loader's samples come from: one shard folder, or a mixture of them (`streams:`).

Every source's manifest is read (locally, or from its remote) and checked against the run before any
shard is touched, and local shards are checked against their index (composer_dlm.data.verify, as the
loader's or stream's `verify` says, once per node), so a
wrong or damaged folder in a mixture fails at start-up naming the stream. A mixture becomes a list of
Streaming `Stream`s with the stream's proportion / repeat / choose; Streaming then draws, shuffles and
resumes mid-epoch over all of them as one dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming import Stream

from composer_dlm.data.config import LoaderConfig
from composer_dlm.data.manifest import check_manifest, locate_manifest
from composer_dlm.data.verify import HASH, once_per_node, verify_split


def source_name(local: str | None, remote: str | None, split: str | None) -> str:
    """How errors name a source: its local (else remote) folder and split, `path/split`."""
    return "/".join(p for p in ((local or remote or "").rstrip("/"), split) if p)


def checked_manifest(
    local: str | None,
    remote: str | None,
    split: str | None,
    *,
    where: str,
    mode: str,
    max_seq_len: int,
    tokenizer: Any,
    download_timeout: float,
    verify: str,
) -> dict[str, Any]:
    """The manifest of one source, checked against the run; local shards also checked against their index
    (`verify`: quick, full or off; see composer_dlm.data.verify)."""
    manifest = locate_manifest(local, remote, split, download_timeout=download_timeout)
    check_manifest(manifest, where=where, mode=mode, max_seq_len=max_seq_len, tokenizer=tokenizer)
    if remote is None:
        assert local is not None  # the configs require local or remote
        folder = Path(local).expanduser() / (split or "")
        num_samples = int(manifest["counts"]["samples"])
        once_per_node(lambda: verify_split(folder, num_samples, verify))
    return manifest


def hash_to_validate(remote: str | None, manifest: dict[str, Any]) -> str | None:
    """The hash Streaming should check on download: shards fetched from a remote, when the index has it."""
    return HASH if remote is not None and manifest.get("hashes") == [HASH] else None


@dataclass
class Mixture:
    """A loader's `streams:` as checked Streaming `Stream`s, in the YAML's order."""

    names: list[str]
    streams: list[Stream]
    manifests: list[dict[str, Any]]

    @property
    def where(self) -> str:
        return "streams " + ", ".join(self.names)

    @property
    def num_samples(self) -> int:
        return sum(int(m["counts"]["samples"]) for m in self.manifests)

    @property
    def seq_len(self) -> int:
        """The longest sample of any stream (for pretraining all equal the run's max_seq_len)."""
        return max(int(m["seq_len"]) for m in self.manifests)


def open_mixture(cfg: LoaderConfig, *, mode: str, max_seq_len: int, tokenizer: Any) -> Mixture:
    """`cfg.streams` as Streams, every one's manifest checked; raises DataError naming the stream at fault."""
    assert cfg.streams, "LoaderConfig requires streams to be non-empty when set"
    names, streams, manifests = [], [], []
    for name, s in cfg.streams.items():
        split = s.split if s.split is not None else cfg.split
        manifest = checked_manifest(
            s.local,
            s.remote,
            split,
            where=f"stream {name!r} ({source_name(s.local, s.remote, split)})",
            mode=mode,
            max_seq_len=max_seq_len,
            tokenizer=tokenizer,
            download_timeout=cfg.download_timeout,
            verify=s.verify or cfg.verify,
        )
        streams.append(
            Stream(
                local=s.local,
                remote=s.remote,
                split=split,
                proportion=s.proportion,
                repeat=s.repeat,
                choose=s.choose,
                validate_hash=hash_to_validate(s.remote, manifest),
            )
        )
        names.append(name)
        manifests.append(manifest)
    return Mixture(names=names, streams=streams, manifests=manifests)


def stream_counts(mixture: Mixture, samples_per_stream: Any) -> list[dict[str, Any]]:
    """Per stream: its samples on disk and the samples it gives each epoch (`Stream.choose`, which
    Streaming sets from proportion / repeat / choose when the dataset is built)."""
    return [
        {"stream": name, "samples": int(total), "per_epoch": int(stream.choose)}
        for name, stream, total in zip(mixture.names, mixture.streams, samples_per_stream, strict=True)
    ]


def stream_hyperparameters(label: str, counts: list[dict[str, Any]]) -> dict[str, int]:
    """The per-stream counts as Composer hyperparameters (written to the run's log file and every other
    logger), e.g. `train_loader/streams/web/samples_per_epoch: 600`, `.../samples: 400`."""
    out = {}
    for c in counts:
        out[f"{label}/streams/{c['stream']}/samples"] = c["samples"]
        out[f"{label}/streams/{c['stream']}/samples_per_epoch"] = c["per_epoch"]
    return out
