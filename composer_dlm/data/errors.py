"""The error type for bad data input: a user mistake, reported with where it is and how to fix it."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data, a bad shard folder or a tokenizer that does not fit.

    The message names the file (and line, row or key) and says how to fix it. Subclasses ValueError
    so that callers catching user mistakes generically still catch it. Carries only its message, so it
    pickles across the tokenisation worker processes.
    """


def first_line(e: BaseException) -> str:
    """``TypeName: first line of the message``: a library's exception, short enough to quote in one of ours."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
