"""LoaderConfig: one dataloader section of the YAML (`train_loader`, `eval_loader`)."""

from __future__ import annotations

from dataclasses import dataclass

from composer_dlm.data.tokenizer import EMBEDDED

PAD_TO = ("longest", "max_seq_len")
SHUFFLE_ALGOS = ("naive", "py1b", "py1br", "py1e", "py1s", "py2s")


@dataclass
class LoaderConfig:
    """Where a loader reads MDS shards from and how it iterates them.

    `local: embedded` means the embedded corpus (CPython's documentation, built and cached on first
    use), with splits `train` and `val`. Otherwise `local` is a shard folder (or, with `remote`, the
    cache folder for shards downloaded from it) and `split` its subfolder. `subset_size` draws that many
    samples per epoch, the same ones every epoch (chosen with `shuffle_seed`), like the original
    trainer's --train_subset_size / --ref_subset_size. `pad_to` (SFT only) pads each batch's answers
    with EOS to the longest sample in it ('longest') or to the run's max_seq_len ('max_seq_len').
    `pin_memory` applies only when CUDA is present; `persistent_workers` and `prefetch_factor` only
    with `num_workers` > 0.
    """

    local: str | None = None
    remote: str | None = None
    split: str | None = None
    shuffle: bool = True
    shuffle_seed: int = 9176
    subset_size: int | None = None
    num_workers: int = 2
    drop_last: bool = True
    pad_to: str = "longest"
    predownload: int | None = None
    persistent_workers: bool = True
    pin_memory: bool = True
    prefetch_factor: int | None = None
    timeout: float = 0.0
    download_retry: int = 2
    download_timeout: float = 60.0
    cache_limit: str | None = None
    num_canonical_nodes: int | None = None
    shuffle_algo: str = "py1e"
    shuffle_block_size: int | None = None

    def __post_init__(self) -> None:
        if not self.local and not self.remote:
            raise ValueError("loader: set `local` (a shard folder, or 'embedded') or `remote`")
        if self.local == EMBEDDED and self.remote:
            raise ValueError("loader: `local: embedded` is the built-in corpus; leave `remote` unset with it")
        if self.pad_to not in PAD_TO:
            raise ValueError(f"loader: pad_to must be one of {PAD_TO}, got {self.pad_to!r}")
        if self.shuffle_algo not in SHUFFLE_ALGOS:
            raise ValueError(
                f"loader: shuffle_algo must be one of {SHUFFLE_ALGOS}, got {self.shuffle_algo!r}"
            )
        if self.shuffle_seed < 0:
            raise ValueError(f"loader: shuffle_seed must be >= 0, got {self.shuffle_seed}")
        for name in (
            "subset_size",
            "predownload",
            "prefetch_factor",
            "num_canonical_nodes",
            "shuffle_block_size",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"loader: {name} must be positive or null, got {value}")
        if self.num_workers < 0:
            raise ValueError(f"loader: num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor is not None and self.num_workers == 0:
            raise ValueError("loader: prefetch_factor needs num_workers > 0; leave it null")
        if self.timeout < 0 or self.download_timeout <= 0 or self.download_retry < 0:
            raise ValueError("loader: timeout must be >= 0, download_timeout > 0, download_retry >= 0")
