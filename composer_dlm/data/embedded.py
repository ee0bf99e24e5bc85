"""The embedded default data: CPython's own documentation text, a tokenizer trained on it, and shards.

Needs no network: the corpus is the help text of `pydoc_data.topics` (the language reference topics)
plus the module docstrings of the top-level standard-library modules. A 4096-token byte-level BPE
tokenizer (EOS, BOS, mask and chat tokens, a chat template) is trained on it, and the corpus is
converted to train/val MDS shards, for pretraining (documents packed into sequences) or for SFT
(question/answer pairs: a topic or module name asks for the first paragraph of its text).

Everything is built on first use and cached under $COMPOSER_DLM_CACHE (default ~/.cache/composer_dlm),
in a folder keyed by the recipe version and the Python version (the corpus comes from the running
Python). Each artefact is built in a temporary folder under a file lock and renamed into place, so
concurrent processes (e.g. the ranks of one node) build it once and never see it half-written.
Building is deterministic: the same Python gives the same tokenizer and shards, byte for byte.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import tokenize
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from composer_dlm.fsutil import staged_folder

CACHE_ENV = "COMPOSER_DLM_CACHE"
RECIPE_VERSION = 3  # bump whenever the corpus, tokenizer or conversion recipe changes
VOCAB_SIZE = 4096
VAL_FRACTION = 0.05
MIN_VAL_SEQUENCES = 8  # long sequences need a larger validation share of this small corpus
CHARS_PER_TOKEN = 4.5  # about what the embedded tokenizer gives on English prose
MIN_DOCSTRING_CHARS = 200
SFT_ANSWER_CHARS = 1200  # SFT answers: the first paragraphs of a text, up to about this many characters


def cache_dir() -> Path:
    """The cache root: $COMPOSER_DLM_CACHE, else ~/.cache/composer_dlm."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/composer_dlm").expanduser()


def embedded_root() -> Path:
    v = sys.version_info
    return cache_dir() / f"embedded-r{RECIPE_VERSION}-py{v.major}.{v.minor}.{v.micro}"


def corpus_documents() -> list[tuple[str, str]]:
    """(title, text) of every document, in a fixed order: pydoc topics by name, then modules by name."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    docs = [(f"topic {name}", reflow(topics[name])) for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/__init__.py"))
    for path in sorted(files, key=lambda p: _module_name(stdlib, p)):
        doc = _module_docstring(path.read_bytes())
        if doc and len(doc) >= MIN_DOCSTRING_CHARS:
            docs.append((f"module {_module_name(stdlib, path)}", reflow(doc)))
    return docs


def reflow(text: str) -> str:
    """Joins the hard-wrapped lines of each paragraph into one line and drops heading underlines
    ("*****", "=====", "-----"), so the corpus reads as prose rather than 70-column layout."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line.strip() for line in block.splitlines()]
        lines = [line for line in lines if line and not re.fullmatch(r"[*=~^-]{3,}", line)]
        if lines:
            paragraphs.append(" ".join(lines))
    return "\n\n".join(paragraphs)


def _module_docstring(source: bytes) -> str | None:
    """The docstring of a module's source, as ast.get_docstring gives it, without parsing the module.

    Reads tokens only up to the first statement (a full parse of the standard library takes seconds).
    """
    try:
        for token in tokenize.tokenize(io.BytesIO(source).readline):
            if token.type in (tokenize.ENCODING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE):
                continue
            if token.type != tokenize.STRING:
                return None
            value = ast.literal_eval(token.string)
            return inspect.cleandoc(value) if isinstance(value, str) else None
    except (tokenize.TokenError, SyntaxError, ValueError):
        return None
    return None


def _module_name(stdlib: Path, path: Path) -> str:
    rel = path.relative_to(stdlib)
    return rel.parent.name if rel.name == "__init__.py" else rel.stem


def _first_paragraphs(text: str, limit: int) -> str:
    out = ""
    for para in text.split("\n\n"):
        if out and len(out) + len(para) > limit:
            break
        out = f"{out}\n\n{para}" if out else para
    return out


def sft_pairs(docs: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Prompt/response pairs from the documents: the title asks, the opening paragraphs answer."""
    pairs = []
    for title, text in docs:
        kind, name = title.split(" ", 1)
        if kind == "topic":
            prompt = f"What does the Python language reference say about '{name}'?"
        else:
            prompt = f"What is the Python standard library module `{name}` for?"
        pairs.append({"prompt": prompt, "response": _first_paragraphs(text, SFT_ANSWER_CHARS)})
    return pairs


def _build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, building it first (into a temporary sibling, renamed) unless it exists."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.is_dir():
            return final
        for stale in final.parent.glob(f".*{final.name}.tmp-*"):  # left by a killed build (and its convert)
            shutil.rmtree(stale, ignore_errors=True)
        with staged_folder(final) as tmp:
            build(tmp)
    return final


def ensure_embedded_tokenizer() -> Path:
    """The folder of the embedded tokenizer (Hugging Face format), built and cached on first use."""

    def build(tmp: Path) -> None:
        from composer_dlm.data.tokenizer import train_bpe_tokenizer

        tokenizer = train_bpe_tokenizer((text for _, text in corpus_documents()), vocab_size=VOCAB_SIZE)
        tokenizer.save_pretrained(str(tmp))

    return _build_once(embedded_root() / "tokenizer", build)


def ensure_embedded_corpus(seq_len: int, mode: str = "pretrain") -> Path:
    """The folder of the embedded corpus as MDS shards (`train/`, `val/`) for `mode` at `seq_len`.

    Tokenised with the embedded tokenizer; built and cached on first use.
    """
    from composer_dlm.data.convert import MODES, ConvertConfig, convert

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ensure_embedded_tokenizer()

    def build(tmp: Path) -> None:
        docs = corpus_documents()
        rows = [{"text": text} for _, text in docs] if mode == "pretrain" else sft_pairs(docs)
        val_fraction = VAL_FRACTION
        if mode == "pretrain":
            total_chars = sum(len(text) for _, text in docs)
            wanted = MIN_VAL_SEQUENCES * seq_len * CHARS_PER_TOKEN / total_chars
            val_fraction = min(0.3, max(VAL_FRACTION, wanted))
        with tempfile.TemporaryDirectory() as src:
            jsonl = Path(src) / f"{mode}.jsonl"
            with jsonl.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            cfg = ConvertConfig(
                inputs=[str(jsonl)],
                out=str(tmp),
                tokenizer="embedded",
                mode=mode,
                seq_len=seq_len,
                val_fraction=val_fraction,
                overlong="truncate",
                progress=False,
            )
            convert(cfg)

    return _build_once(embedded_root() / f"{mode}-seq{seq_len}", build)
