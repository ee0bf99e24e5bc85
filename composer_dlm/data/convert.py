"""Converting a corpus to MDS shards: records -> token ids (in parallel) -> sequences -> MDSWriter.

Pretraining: documents become [BOS] ids [EOS], are concatenated and cut into sequences of exactly
`seq_len` tokens (column `tokens`, ndarray:uint32); the incomplete tail is dropped and counted.
SFT: each conversation becomes one sample (columns `tokens`, ndarray:uint32, and `prompt_length`,
uint32); samples over `seq_len` are dropped or have their answer truncated.

Record i goes to the validation split when floor((i + 1) * f) > floor(i * f) for f = val_fraction,
which spreads exactly floor(n * f) validation records evenly over the input, deterministically.

Output is written into a hidden temporary folder next to `out`, which is renamed to `out` only after
every shard, index and manifest is complete; a failure or interruption leaves no folder at `out`.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from streaming import MDSWriter

from composer_dlm.data.embedded import resolve_tokenizer
from composer_dlm.data.encode import EMPTY_ANSWER, Encoder, encode_in_worker, init_worker
from composer_dlm.data.errors import DataError
from composer_dlm.data.manifest import (
    INDEX_NAME,
    MANIFEST_NAME,
    build_manifest,
    tokenizer_info,
    write_manifest,
)
from composer_dlm.data.remote import (
    check_remote_out,
    is_remote,
    remote_staging,
    upload_manifest,
    writer_out,
)
from composer_dlm.data.sources import Fields, HFDataset, InputSource, Record, open_inputs
from composer_dlm.data.verify import HASH
from composer_dlm.fsutil import remove_stale_staging, staged_folder

MODES = ("pretrain", "sft")
OVERLONG = ("drop", "truncate")
TRAIN, VAL = "train", "val"
COLUMNS = {
    "pretrain": {"tokens": "ndarray:uint32"},
    "sft": {"tokens": "ndarray:uint32", "prompt_length": "uint32"},
}


@dataclass
class ConvertConfig:
    """What to convert and how. See scripts/convert_to_mds.py for the meaning of each option."""

    inputs: list[str]
    out: str
    tokenizer: str
    mode: str = "pretrain"
    seq_len: int = 2048
    fields: Fields = field(default_factory=Fields)
    val_fraction: float = 0.0
    max_samples: int | None = None
    compression: str | None = None
    num_proc: int = 1
    overlong: str = "drop"
    drop_empty_answers: bool = False
    overwrite: bool = False
    shard_size: str = "64mb"
    chunk_size: int = 256
    progress: bool = True
    hf_dataset: HFDataset | None = None  # instead of `inputs`

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be positive, got {self.max_samples}")
        if self.num_proc < 1 or self.chunk_size < 1:
            raise ValueError(
                f"num_proc and chunk_size must be positive, got {self.num_proc}, {self.chunk_size}"
            )
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {self.overlong!r}")
        _check_shard_size(self.shard_size)
        if self.compression is not None:
            from streaming.base.compression import get_compressions, is_compression

            if not is_compression(self.compression):
                raise ValueError(
                    f"unknown compression {self.compression!r}; e.g. zstd ({sorted(get_compressions())})"
                )


def _check_shard_size(shard_size: str) -> None:
    """Refuse a shard size MDSWriter would refuse, now rather than after the tokenizer has loaded."""
    from streaming.base.util import bytes_to_int

    try:
        size = bytes_to_int(shard_size)
    except ValueError:
        size = -1
    if not 0 <= size < 2**32:  # MDSWriter's bounds: byte offsets are stored as uint32
        raise ValueError(f"shard_size must be a size under 4gb such as 64mb or 512kb, got {shard_size!r}")


@dataclass
class SplitCounts:
    """What went into one split. `dropped_tokens` are tokens read but not written."""

    documents: int = 0
    empty_documents: int = 0
    samples: int = 0
    tokens: int = 0
    truncated_samples: int = 0
    dropped_overlong: int = 0
    dropped_empty_answers: int = 0
    dropped_tokens: int = 0


@dataclass
class ConvertSummary:
    out: Path | str  # a local folder, or the remote URL
    mode: str
    seq_len: int
    splits: dict[str, SplitCounts]
    seconds: float

    def format(self) -> str:
        """A small table of the counts, one column per split."""
        rows = list(asdict(next(iter(self.splits.values()))))
        names = list(self.splits)
        lines = [f"{self.mode} shards of seq_len {self.seq_len} in {self.out} ({self.seconds:.1f} s)"]
        lines.append(f"{'':22}" + "".join(f"{n:>14}" for n in names))
        for row in rows:
            lines.append(f"{row:22}" + "".join(f"{getattr(self.splits[n], row):>14,}" for n in names))
        return "\n".join(lines)


class _SplitWriter:
    """Writes one split: packs pretraining documents into sequences, applies the SFT length policy."""

    def __init__(self, folder: Path, cfg: ConvertConfig) -> None:
        self.cfg = cfg
        self.counts = SplitCounts()
        self.writer = MDSWriter(
            out=writer_out(folder, cfg.out),
            keep_local=True,  # a remote's local staging folder is removed with the conversion's
            columns=COLUMNS[cfg.mode],
            compression=cfg.compression,
            size_limit=cfg.shard_size,
            hashes=[HASH],
        )
        self._pending: list[np.ndarray] = []
        self._pending_len = 0

    def add(self, result: Any) -> None:
        self.counts.documents += 1
        if self.cfg.mode == "pretrain":
            self._add_document(result)
        else:
            self._add_example(result)

    def _add_document(self, ids: np.ndarray | None) -> None:
        if ids is None:
            self.counts.empty_documents += 1
            return
        self._pending.append(ids)
        self._pending_len += len(ids)
        seq_len = self.cfg.seq_len
        if self._pending_len < seq_len:
            return
        buffer = np.concatenate(self._pending)
        num_full = len(buffer) // seq_len
        for i in range(num_full):
            self.writer.write({"tokens": buffer[i * seq_len : (i + 1) * seq_len]})
        self.counts.samples += num_full
        self.counts.tokens += num_full * seq_len
        rest = buffer[num_full * seq_len :]
        self._pending = [rest] if len(rest) else []
        self._pending_len = len(rest)

    def _add_example(self, result: tuple[np.ndarray, np.ndarray] | str) -> None:
        if isinstance(result, str):
            assert result == EMPTY_ANSWER
            self.counts.dropped_empty_answers += 1
            return
        prompt, answer = result
        room = self.cfg.seq_len - len(prompt)
        if len(answer) > room:
            if self.cfg.overlong == "drop" or room < 1:
                self.counts.dropped_overlong += 1
                self.counts.dropped_tokens += len(prompt) + len(answer)
                return
            self.counts.truncated_samples += 1
            self.counts.dropped_tokens += len(answer) - room
            answer = answer[:room]
        tokens = np.concatenate([prompt, answer])
        self.writer.write({"tokens": tokens, "prompt_length": len(prompt)})
        self.counts.samples += 1
        self.counts.tokens += len(tokens)

    def finish(self) -> SplitCounts:
        self.writer.finish()
        self.counts.dropped_tokens += self._pending_len
        return self.counts


def _is_val(index: int, fraction: float) -> bool:
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _pool(num_proc: int, encoder: Encoder) -> ProcessPoolExecutor:
    """Tokenisation worker processes, each encoding with an unpickled copy of `encoder`.

    Spawned, never forked: a fork copies the parent's locks as they are, and a parent that already runs threads
    (a tokenizer's thread pool, a progress-bar monitor, a Trainer's helpers) can hand a worker a lock no thread
    will ever release, which hangs the worker and then the pool's shutdown. Spawned workers start clean; the
    price is an import per worker and the usual `if __name__ == "__main__":` guard in a calling script.
    An executor rather than multiprocessing.Pool: a worker that dies (killed, out of memory) breaks it, which
    `_encoded` reports, where a Pool would wait forever for that worker's chunk.
    """
    return ProcessPoolExecutor(
        num_proc,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(encoder,),
    )


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread for the block: a process started meanwhile inherits the block (across exec),
    so Ctrl-C, which the terminal sends to the whole process group, reaches only the parent; a Ctrl-C that
    arrives meanwhile is delivered to this thread on the way out, not lost. Without it a worker still importing
    (before its initializer ignores SIGINT) would die with a traceback of its own."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _encoded(
    chunks: Iterator[list[Record]], encoder: Encoder, pool: ProcessPoolExecutor | None, num_proc: int
) -> Iterator[list[Any]]:
    """Encoded chunks in input order: in this process, or over the pool with bounded read-ahead."""
    if pool is None:
        for chunk in chunks:
            yield encoder.encode(chunk)
        return
    pending: deque[Future[list[Any]]] = deque()
    try:
        for chunk in chunks:
            # A submit may start a worker, which then never sees the terminal's Ctrl-C.
            with _sigint_blocked():
                pending.append(pool.submit(encode_in_worker, chunk))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as e:
        raise DataError(
            f"a tokenisation worker process died ({e}); it was killed from outside, most often for memory: "
            f"run again with a smaller --num-proc (was {num_proc}), or without it"
        ) from None


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, non-empty without `overwrite`, or not a conversion's output."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise DataError(
            f"output folder {out} is not empty; pass --overwrite to replace it, or choose another --out"
        )
    foreign = [
        p.name for p in out.iterdir() if not (p / MANIFEST_NAME).is_file() and not (p / INDEX_NAME).is_file()
    ]
    if foreign:
        raise DataError(
            f"output folder {out} holds {', '.join(sorted(foreign)[:5])}, which no conversion wrote; "
            "--overwrite replaces only a previous conversion's output, so delete the folder yourself or "
            "choose another --out"
        )


def _write_splits(
    cfg: ConvertConfig, source: InputSource, encoder: Encoder, tmp: Path
) -> dict[str, SplitCounts]:
    """Read, encode and write every record into `tmp/<split>`; return the counts per split."""
    from tqdm import tqdm

    with ExitStack() as stack:
        pool = None
        if cfg.num_proc > 1:
            pool = _pool(cfg.num_proc, encoder)
            # On any exit: drop the chunks not started yet; workers end after their current chunk.
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        writers = {s: _SplitWriter(tmp / s, cfg) for s in ([TRAIN, VAL] if cfg.val_fraction > 0 else [TRAIN])}
        records = source.records(mode=cfg.mode, fields=cfg.fields)
        if cfg.max_samples is not None:
            records = itertools.islice(records, cfg.max_samples)
        index = 0
        bar = stack.enter_context(
            tqdm(desc=f"tokenising ({cfg.mode})", unit=" docs", disable=not cfg.progress)
        )
        for results in _encoded(_chunks(records, cfg.chunk_size), encoder, pool, cfg.num_proc):
            for result in results:
                writers[VAL if _is_val(index, cfg.val_fraction) else TRAIN].add(result)
                index += 1
            bar.update(len(results))
            bar.set_postfix(sequences=sum(w.counts.samples for w in writers.values()), refresh=False)
    if index == 0:
        raise DataError(f"empty input: no documents in {source.describe()}")
    counts = {s: w.finish() for s, w in writers.items()}
    for split, c in counts.items():
        if c.samples == 0:
            raise DataError(
                f"split {split!r} got no sample ({c.documents} documents, {c.dropped_tokens} tokens, "
                f"{c.dropped_overlong} over-long, {c.dropped_empty_answers} empty answers): {_no_sample_fix(cfg, c)}"
            )
    return counts


def _no_sample_fix(cfg: ConvertConfig, c: SplitCounts) -> str:
    """What to change when a split got no sample: the length limit is the usual cause, and which way it
    must move depends on the mode (pretraining packs documents into sequences, SFT drops long samples)."""
    if cfg.mode == "sft" and c.dropped_overlong:
        return (
            f"raise --seq-len above {cfg.seq_len}, or pass --overlong truncate to cut long answers, "
            "or give more data"
        )
    if cfg.mode == "pretrain" and c.empty_documents < c.documents:
        return (
            f"lower --seq-len below {cfg.seq_len} (its documents do not fill one sequence), give more data, "
            "or raise --val-fraction"
        )
    return "give more data, or change --val-fraction"


def convert(cfg: ConvertConfig) -> ConvertSummary:
    """Convert `cfg.inputs` to MDS shards in `cfg.out/train` (and `cfg.out/val`), with manifests.

    Raises DataError for bad input (naming file and line) before anything appears at `cfg.out`.
    """
    start = time.perf_counter()
    remote = is_remote(cfg.out)
    out = Path(cfg.out).expanduser().absolute()
    if remote:
        check_remote_out(cfg.out, cfg.overwrite)
    else:
        _check_out(out, cfg.overwrite)
    source = open_inputs(cfg.inputs, cfg.hf_dataset)
    tokenizer = resolve_tokenizer(cfg.tokenizer)
    # Fails on a tokenizer without EOS before any work.
    encoder = Encoder(tokenizer, mode=cfg.mode, drop_empty_answers=cfg.drop_empty_answers)

    if not remote:
        remove_stale_staging(out)  # left by a conversion killed midway
    with remote_staging() if remote else staged_folder(out) as tmp:
        counts = _write_splits(cfg, source, encoder, tmp)
        info = tokenizer_info(tokenizer, cfg.tokenizer)
        for split, c in counts.items():
            manifest = build_manifest(
                mode=cfg.mode,
                split=split,
                seq_len=cfg.seq_len,
                columns=COLUMNS[cfg.mode],
                compression=cfg.compression,
                tokenizer=info,
                counts=asdict(c),
                inputs=source.names(),
                options={
                    "val_fraction": cfg.val_fraction,
                    "max_samples": cfg.max_samples,
                    "overlong": cfg.overlong,
                    "drop_empty_answers": cfg.drop_empty_answers,
                    "fields": asdict(cfg.fields),
                },
                hashes=[HASH],
            )
            write_manifest(tmp / split, manifest)
            if remote:
                upload_manifest(tmp / split, cfg.out, MANIFEST_NAME)
        if not remote:
            _check_out(out, cfg.overwrite)  # again: an output may have appeared meanwhile
    return ConvertSummary(
        out=cfg.out if remote else out,
        mode=cfg.mode,
        seq_len=cfg.seq_len,
        splits=counts,
        seconds=time.perf_counter() - start,
    )
