"""Reading conversion input: plain-text, JSONL and Parquet files, or folders of them, into records.

Every record carries `where` (`path:line` for text and JSONL, `path row N` for Parquet) so that any
later error can name it. Pretraining records hold a text; SFT records hold a conversation as a list
of {"role", "content"} messages whose last one is the assistant's answer (a prompt/response pair
becomes [user: prompt, assistant: response]).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer_dlm.data.errors import DataError

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


def _decode(data: bytes, path: Path, first_line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data[: e.start].count(b"\n")
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
