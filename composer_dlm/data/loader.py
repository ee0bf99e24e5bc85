"""build_dataloader: a LoaderConfig section -> a torch DataLoader of pretraining or SFT batches."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from composer_dlm.data.collate import SFTCollator, collate_pretrain
from composer_dlm.data.config import LoaderConfig
from composer_dlm.data.convert import MODES
from composer_dlm.data.datasets import PretrainDataset, SFTDataset
from composer_dlm.data.embedded_shards import check_run_tokenizer, ensure_embedded_corpus
from composer_dlm.data.shm import clean_stale_shared_memory
from composer_dlm.data.tokenizer import EMBEDDED


def build_dataloader(
    cfg: LoaderConfig, *, tokenizer: Any, mode: str, max_seq_len: int, device_batch_size: int
) -> DataLoader:
    """A DataLoader over the shards of `cfg` for `mode` ('pretrain' or 'sft').

    Batches: pretraining {"input_ids": LongTensor (B, max_seq_len)}; SFT {"input_ids": LongTensor
    (B, L), "prompt_lengths": LongTensor (B,)}, answers right-padded with EOS to L (the longest sample
    of the batch, or max_seq_len with pad_to='max_seq_len'). `loader.dataset` is the StreamingDataset
    whose state_dict / load_state_dict resume mid-epoch. Raises DataError for missing shards or shards
    that do not fit the run.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if device_batch_size < 1 or max_seq_len < 2:
        raise ValueError(
            f"device_batch_size must be >= 1 and max_seq_len >= 2, got {device_batch_size}, {max_seq_len}"
        )
    clean_stale_shared_memory()
    local = cfg.local
    if local == EMBEDDED:
        if cfg.split is None:
            raise ValueError(
                "loader: the embedded corpus has splits 'train' and 'val'; set `split` to one of them"
            )
        check_run_tokenizer(tokenizer)
        local = str(ensure_embedded_corpus(max_seq_len, mode))
    dataset_cls = PretrainDataset if mode == "pretrain" else SFTDataset
    dataset = dataset_cls(
        cfg, local=local, tokenizer=tokenizer, max_seq_len=max_seq_len, batch_size=device_batch_size
    )
    if mode == "pretrain":
        collate_fn: Any = collate_pretrain
    else:
        pad_to_length = max_seq_len if cfg.pad_to == "max_seq_len" else None
        collate_fn = SFTCollator(eos_token_id=int(tokenizer.eos_token_id), pad_to_length=pad_to_length)
    workers = cfg.num_workers > 0
    return DataLoader(
        dataset,
        batch_size=device_batch_size,
        collate_fn=collate_fn,
        num_workers=cfg.num_workers,
        drop_last=cfg.drop_last,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        persistent_workers=cfg.persistent_workers and workers,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        timeout=cfg.timeout,
    )
