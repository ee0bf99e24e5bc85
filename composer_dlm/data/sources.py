"""Reading conversion input into records: plain-text, JSONL and Parquet files (or folders of them), or
a Hugging Face dataset (a hub id or loader name such as "json", or a `save_to_disk` folder).

Every record carries `where` (`path:line` for text and JSONL, `path row N` for Parquet, `NAME[split]
row N` for a dataset) so that any later error can name it. Pretraining records hold a text; SFT records hold a conversation as a list
of {"role", "content"} messages whose last one is the assistant's answer (a prompt/response pair
becomes [user: prompt, assistant: response]).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from composer_dlm.data.errors import DataError, first_line

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


@dataclass(frozen=True)
class Fields:
    """Names of the record fields (JSONL keys, Parquet columns) to read."""

    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"


@dataclass(frozen=True)
class Record:
    """One input document (pretraining: `text`) or conversation (SFT: `messages`)."""

    where: str
    text: str | None = None
    messages: list[dict[str, str]] | None = None


class InputSource(Protocol):
    """What a conversion reads: files, or a Hugging Face dataset."""

    def records(self, *, mode: str, fields: Fields) -> Iterator[Record]: ...

    def describe(self) -> str:
        """The input, for messages."""
        ...

    def names(self) -> list[str]:
        """The input, for the manifest (file names, or the dataset's name/config/split)."""
        ...


@dataclass(frozen=True)
class InputFiles:
    """Local text, JSONL and Parquet files, read in order."""

    files: list[Path]

    def records(self, *, mode: str, fields: Fields) -> Iterator[Record]:
        return read_records(self.files, mode=mode, fields=fields)

    def describe(self) -> str:
        return ", ".join(map(str, self.files))

    def names(self) -> list[str]:
        return [p.name for p in self.files]


@dataclass(frozen=True)
class HFDataset:
    """A Hugging Face dataset read with the `datasets` library (the `hf` extra).

    `name` is a hub id (read from the hub, or from the local cache with HF_DATASETS_OFFLINE=1), a packaged
    loader ("json", "parquet", "csv", "text") with `data_files`, or a folder written by `save_to_disk`.
    `config` is the dataset's configuration (subset), `split` the split to convert. Datasets that allow it
    are streamed (nothing is downloaded in full or cached as Arrow first).
    """

    name: str
    config: str | None = None
    split: str = "train"
    data_files: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [self.name, *([self.config] if self.config else [])]
        return f"{'/'.join(parts)}[{self.split}]"

    def names(self) -> list[str]:
        return [self.describe(), *(Path(f).name for f in self.data_files)]

    def records(self, *, mode: str, fields: Fields) -> Iterator[Record]:
        rows = self._open()
        columns = list(getattr(rows, "column_names", None) or [])
        available = f"columns {columns}" if columns else "its columns"
        for i, row in enumerate(rows, start=1):
            yield _make_record(row, f"{self.describe()} row {i}", mode, fields, available=available)

    def _open(self) -> Any:
        try:
            import datasets
        except ImportError:
            raise DataError(
                "--hf-dataset needs the `datasets` library: pip install 'composer-dlm[hf]'"
            ) from None
        folder = Path(self.name).expanduser()
        if folder.is_dir() and not self.data_files:
            return self._from_disk(datasets, folder)
        kwargs: dict[str, Any] = {"data_files": self.data_files or None}
        try:
            try:
                return datasets.load_dataset(
                    self.name, self.config, split=self.split, streaming=True, **kwargs
                )
            except NotImplementedError:  # a dataset that cannot stream: load it (cached as Arrow) instead
                return datasets.load_dataset(self.name, self.config, split=self.split, **kwargs)
        except Exception as e:  # datasets raises many types (not found, offline, bad config/split, bad files)
            raise DataError(
                f"Hugging Face dataset {self.describe()}: {first_line(e)}; check the name, --hf-config and "
                "--hf-split (and --hf-data-files for 'json'/'parquet'/'csv'), and that it is cached when offline"
            ) from None

    def _from_disk(self, datasets: Any, folder: Path) -> Any:
        try:
            loaded = datasets.load_from_disk(str(folder))
        except Exception as e:  # FileNotFoundError for a folder save_to_disk did not write, and others
            raise DataError(
                f"{folder}: not a dataset folder written by save_to_disk ({first_line(e)}); give a hub id, "
                "or 'json'/'parquet' with --hf-data-files"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if self.split not in loaded:
                raise DataError(
                    f"{folder}: no split {self.split!r} (it has {', '.join(loaded)}); pass --hf-split"
                )
            return loaded[self.split]
        return loaded


def open_inputs(inputs: Sequence[str], hf_dataset: HFDataset | None) -> InputSource:
    """The conversion's input: the files and folders `inputs`, or `hf_dataset` (exactly one of them)."""
    if hf_dataset is None:
        return InputFiles(list_input_files(inputs))
    if inputs:
        raise DataError(
            f"give input files ({', '.join(inputs)}) or --hf-dataset {hf_dataset.name}, not both; to convert "
            f"local JSONL/Parquet files as a dataset use --hf-dataset json --hf-data-files FILE"
        )
    return hf_dataset


def list_input_files(inputs: Sequence[str]) -> list[Path]:
    """Expand files and folders (recursively, sorted, hidden entries skipped) into input files."""
    if not inputs:
        raise DataError("no input given: pass at least one file or folder")
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix in SUPPORTED
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(
                    f"input folder {path} holds no input file (looked for {', '.join(SUPPORTED)}); "
                    "point at the folder that holds the data or rename the files"
                )
            files.extend(found)
        elif path.is_file():
            if path.suffix not in SUPPORTED:
                raise DataError(
                    f"input {path}: unsupported file type {path.suffix!r}; supported: {', '.join(SUPPORTED)} "
                    "(decompress .gz/.zst files first)"
                )
            files.append(path)
        else:
            raise DataError(f"input {path}: no such file or folder")
    return files


def read_records(files: Sequence[Path], *, mode: str, fields: Fields) -> Iterator[Record]:
    """Yield the records of `files` in order. `mode` is 'pretrain' (texts) or 'sft' (conversations)."""
    for path in files:
        if path.suffix in TEXT_SUFFIXES:
            if mode != "pretrain":
                raise DataError(
                    f"{path}: plain-text files hold no prompt/answer structure; give SFT data as JSONL "
                    f"or Parquet with {fields.messages!r} or {fields.prompt!r}/{fields.response!r} fields"
                )
            yield Record(where=f"{path}:1", text=_read_text_file(path))
        elif path.suffix in JSONL_SUFFIXES:
            yield from _read_jsonl(path, mode, fields)
        else:
            yield from _read_parquet(path, mode, fields)


def _decode(data: bytes, path: Path, start_line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = start_line + data[: e.start].count(b"\n")
        raise DataError(
            f"{path}:{line}: bytes that are not valid UTF-8 ({e.reason} at {data[e.start : e.start + 4]!r}); "
            "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _read_text_file(path: Path) -> str:
    text = _decode(path.read_bytes(), path, 1)
    return text[1:] if text.startswith("\ufeff") else text  # drop a byte-order mark


def iter_jsonl_objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for each non-blank line of a JSONL file, ``where`` being ``file:line``.

    Undecodable bytes, invalid JSON and non-object lines are DataErrors naming the file and line.
    """
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode(raw, path, line_no)
            if line_no == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: not valid JSON ({e.msg} at column {e.colno}); one object per line"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object per line, found {type(obj).__name__}")
            yield where, obj


def _read_jsonl(path: Path, mode: str, fields: Fields) -> Iterator[Record]:
    for where, obj in iter_jsonl_objects(path):
        yield _make_record(obj, where, mode, fields, available=f"keys {sorted(obj)}")


def _read_parquet(path: Path, mode: str, fields: Fields) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    names = parquet.schema_arrow.names
    if mode == "pretrain":
        columns = [fields.text]
    elif fields.messages in names:
        columns = [fields.messages]
    else:
        columns = [fields.prompt, fields.response]
    missing = [c for c in columns if c not in names]
    if missing:
        wanted = (
            fields.text
            if mode == "pretrain"
            else f"{fields.messages!r} or {fields.prompt!r}+{fields.response!r}"
        )
        raise DataError(
            f"{path}: no column {missing[0]!r} (needs {wanted}; columns: {names}); "
            "name the right column with --text-field / --messages-field / --prompt-field / --response-field"
        )
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
        for obj in batch.to_pylist():
            row += 1
            yield _make_record(obj, f"{path} row {row}", mode, fields, available=f"columns {names}")


def _make_record(obj: dict[str, Any], where: str, mode: str, fields: Fields, available: str) -> Record:
    if mode == "pretrain":
        return Record(where=where, text=_string(obj, fields.text, where, available, "--text-field"))
    if obj.get(fields.messages) is not None:
        return Record(where=where, messages=_messages(obj[fields.messages], where, fields.messages))
    if fields.prompt in obj and fields.response in obj:
        prompt = _string(obj, fields.prompt, where, available, "--prompt-field")
        response = _string(obj, fields.response, where, available, "--response-field")
        return Record(
            where=where,
            messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        )
    raise DataError(
        f"{where}: an SFT record needs {fields.messages!r} or both {fields.prompt!r} and {fields.response!r} "
        f"({available}); name the fields with --messages-field or --prompt-field/--response-field"
    )


def _string(obj: dict[str, Any], key: str, where: str, available: str, flag: str) -> str:
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r} ({available}); name the field with {flag}")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} should be a string, found {type(value).__name__}")
    _check_encodable(value, where, key)
    return value


def _check_encodable(value: str, where: str, key: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: field {key!r} holds an unpaired surrogate ({value[e.start]!r} at character {e.start}), "
            "which is no valid text; fix the escape sequence in the source"
        ) from None


def _messages(value: Any, where: str, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or len(value) < 2:
        raise DataError(
            f"{where}: field {key!r} should be a list of at least two messages (the prompt turns, then the "
            "assistant's answer)"
        )
    messages = []
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(f"{where}: {key}[{i}] should be an object with string 'role' and 'content'")
        _check_encodable(message["content"], where, f"{key}[{i}].content")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message of {key!r} has role {messages[-1]['role']!r}; it must be the "
            "assistant's answer (drop trailing turns or fix the role)"
        )
    return messages
