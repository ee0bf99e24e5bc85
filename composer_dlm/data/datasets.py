"""StreamingDataset subclasses over our MDS shards: pretraining sequences and SFT examples.

Both check the split's manifest against the run (mode, sequence length, tokenizer) and, for local
shards, every shard's size and hash against the index (composer_dlm.data.verify; hashes once per shard
with the default `verify: quick`) before reading a sample, so a wrong folder or a damaged file fails at start-up with a message naming it and the fix.
Shards downloaded from a remote are hash-checked by Streaming itself as they arrive. Mid-epoch resumption is
StreamingDataset's own: `state_dict(num_samples, from_beginning)` / `load_state_dict(obj)`, which
Composer calls on the train dataloader's dataset.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from streaming import StreamingDataset

from composer_dlm.data.config import LoaderConfig
from composer_dlm.data.errors import DataError
from composer_dlm.data.shm import register_live_dataset
from composer_dlm.data.streams import (
    checked_manifest,
    hash_to_validate,
    open_mixture,
    source_name,
    stream_counts,
)


class _TokenDataset(StreamingDataset):
    mode: ClassVar[str]

    def __init__(
        self, cfg: LoaderConfig, *, local: str | None, tokenizer: Any, max_seq_len: int, batch_size: int
    ) -> None:
        """`local` overrides cfg.local (the builder resolves 'embedded' to the cached folder)."""
        mixture = None
        if cfg.streams is not None:
            mixture = open_mixture(cfg, mode=self.mode, max_seq_len=max_seq_len, tokenizer=tokenizer)
            where, manifest, num_samples = mixture.where, mixture.manifests[0], mixture.num_samples
        else:
            where = source_name(local, cfg.remote, cfg.split)
            manifest = checked_manifest(
                local,
                cfg.remote,
                cfg.split,
                where=where,
                mode=self.mode,
                max_seq_len=max_seq_len,
                tokenizer=tokenizer,
                download_timeout=cfg.download_timeout,
                verify=cfg.verify,
            )
            num_samples = int(manifest["counts"]["samples"])
        if cfg.subset_size is not None and cfg.subset_size > num_samples:
            raise DataError(
                f"{where}: subset_size {cfg.subset_size} is more than the {num_samples} samples there; "
                f"set subset_size to at most {num_samples}, or null for all"
            )
        super().__init__(
            streams=mixture.streams if mixture else None,
            local=None if mixture else local,
            remote=cfg.remote,
            split=cfg.split,
            download_retry=cfg.download_retry,
            download_timeout=cfg.download_timeout,
            epoch_size=cfg.subset_size,
            predownload=cfg.predownload,
            cache_limit=cfg.cache_limit,
            sampling_method="fixed" if cfg.subset_size is not None else "balanced",
            num_canonical_nodes=cfg.num_canonical_nodes,
            batch_size=batch_size,
            shuffle=cfg.shuffle,
            shuffle_algo=cfg.shuffle_algo,
            shuffle_seed=cfg.shuffle_seed,
            shuffle_block_size=cfg.shuffle_block_size,
            validate_hash=hash_to_validate(cfg.remote, manifest),
        )
        self.where = where
        self.manifest = manifest
        self.seq_len = mixture.seq_len if mixture else int(manifest["seq_len"])
        # Per stream of a mixture: samples on disk and per epoch (the builder logs them).
        self.stream_counts = stream_counts(mixture, self.samples_per_stream) if mixture else []
        self.vocab_size = int(manifest["tokenizer"]["vocab_size"])
        register_live_dataset(self)

    def _tokens(self, idx: int) -> tuple[np.ndarray, dict[str, Any]]:
        sample = super().__getitem__(idx)
        tokens = sample["tokens"]
        if tokens.ndim != 1 or len(tokens) > self.seq_len:
            raise DataError(
                f"{self.where}: sample {idx} has shape {tokens.shape}, not at most ({self.seq_len},) as the "
                "manifest says; the folder mixes conversions, convert it again"
            )
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            raise DataError(
                f"{self.where}: sample {idx} holds token id {int(tokens.max())}, outside the tokenizer's "
                f"{self.vocab_size} ids; the shard is corrupt, convert it again"
            )
        return tokens, sample


class PretrainDataset(_TokenDataset):
    """Yields {"input_ids": LongTensor (seq_len,)}."""

    mode = "pretrain"

    # By int only: streaming's Array.__getitem__ is typed for slices and index arrays too (fancy indexing).
    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        tokens, _ = self._tokens(idx)
        if len(tokens) != self.seq_len:
            raise DataError(
                f"{self.where}: sample {idx} has {len(tokens)} tokens, not {self.seq_len}; convert again"
            )
        return {"input_ids": torch.from_numpy(tokens.astype(np.int64))}


class SFTDataset(_TokenDataset):
    """Yields {"input_ids": LongTensor (n,), "prompt_length": int}, unpadded (SFTCollator pads)."""

    mode = "sft"

    # By int only: streaming's Array.__getitem__ is typed for slices and index arrays too (fancy indexing).
    def __getitem__(self, idx: int) -> dict[str, Any]:  # type: ignore[override]
        tokens, sample = self._tokens(idx)
        return {
            "input_ids": torch.from_numpy(tokens.astype(np.int64)),
            "prompt_length": int(sample["prompt_length"]),
        }
