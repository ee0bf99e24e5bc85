"""Turning records into token ids, for pretraining documents and SFT prompt/answer pairs.

Pretraining: [BOS] + ids(text) + [EOS] (BOS only where the tokenizer has one).

SFT: the prompt is every turn before the last (the assistant's answer). With a chat template, the
prompt text is the template applied to the prompt turns with the generation prompt, the answer text is
what the template renders for the whole conversation beyond that prefix; the two are tokenised
separately so the split is exact. Without a template only a single user/assistant pair is accepted:
prompt = [BOS] + ids(prompt), answer = ids(response). The answer always ends with EOS (one is added
unless the template already put it there), so a model learns to stop.

Runs in tokenisation worker processes as well as in the main one; errors are DataError naming the record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from composer_dlm.data.errors import DataError
from composer_dlm.data.sources import Record

TokenArray = NDArray[np.uint32]
EMPTY_ANSWER = "empty_answer"  # an SFT result that was dropped for its empty answer


class Encoder:
    """Encodes batches of records with one tokenizer. `mode` is 'pretrain' or 'sft'."""

    def __init__(self, tokenizer: Any, *, mode: str, drop_empty_answers: bool = False) -> None:
        if tokenizer.eos_token_id is None:
            raise DataError(
                f"tokenizer {tokenizer.name_or_path!r} has no EOS token, which ends every document and "
                "pads SFT answers; set one (tokenizer.eos_token = ..., then save_pretrained)"
            )
        self.tokenizer = tokenizer
        self.mode = mode
        self.drop_empty_answers = drop_empty_answers
        self.eos_id = int(tokenizer.eos_token_id)
        self.bos_ids = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def encode(self, records: Sequence[Record]) -> list[Any]:
        """Pretraining: a token array per record (None for an empty text).

        SFT: a (prompt_ids, answer_ids) pair per record, or EMPTY_ANSWER when dropped for that.
        """
        if self.mode == "pretrain":
            return self._encode_documents(records)
        return self._encode_conversations(records)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def _encode_documents(self, records: Sequence[Record]) -> list[TokenArray | None]:
        texts = [r.text for r in records if r.text]
        encoded = iter(self._ids(texts))
        out: list[TokenArray | None] = []
        for record in records:
            if not record.text:
                out.append(None)
            else:
                out.append(np.asarray(self.bos_ids + next(encoded) + [self.eos_id], dtype=np.uint32))
        return out

    def _encode_conversations(self, records: Sequence[Record]) -> list[tuple[TokenArray, TokenArray] | str]:
        rendered: list[tuple[str, str] | None] = []
        for record in records:
            assert record.messages is not None
            if not record.messages[-1]["content"].strip():
                if not self.drop_empty_answers:
                    raise DataError(
                        f"{record.where}: empty answer (the last assistant turn has no text); fix the "
                        "record, or pass --drop-empty-answers to skip such records"
                    )
                rendered.append(None)
            else:
                rendered.append(self._render(record))
        kept = [r for r in rendered if r is not None]
        prompt_ids = iter(self._ids([p for p, _ in kept]))
        answer_ids = iter(self._ids([a for _, a in kept]))
        out: list[tuple[TokenArray, TokenArray] | str] = []
        for r in rendered:
            if r is None:
                out.append(EMPTY_ANSWER)
                continue
            prompt = next(prompt_ids)
            answer = next(answer_ids)
            if self.has_template:
                prompt_arr = prompt
            else:
                prompt_arr = self.bos_ids + prompt
            if not answer or answer[-1] != self.eos_id:
                answer = answer + [self.eos_id]
            out.append((np.asarray(prompt_arr, dtype=np.uint32), np.asarray(answer, dtype=np.uint32)))
        return out

    def _render(self, record: Record) -> tuple[str, str]:
        """(prompt text, answer text) of a conversation."""
        messages = record.messages
        assert messages is not None
        if not self.has_template:
            if len(messages) != 2 or messages[0]["role"] != "user":
                raise DataError(
                    f"{record.where}: the tokenizer has no chat template, so only a single user prompt and "
                    "answer can be rendered (as plain text); give prompt/response pairs or use a tokenizer "
                    "with a chat template"
                )
            return messages[0]["content"], messages[1]["content"]
        try:
            prompt = self.tokenizer.apply_chat_template(
                messages[:-1], tokenize=False, add_generation_prompt=True
            )
            full = self.tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as e:  # jinja2 raises TemplateError and others for conversations it rejects
            raise DataError(
                f"{record.where}: the tokenizer's chat template rejected this conversation ({e})"
            ) from e
        if not full.startswith(prompt):
            raise DataError(
                f"{record.where}: the chat template does not render the prompt turns (with the generation "
                "prompt) as a prefix of the whole conversation, so the answer cannot be split off exactly; "
                "use a tokenizer whose template does"
            )
        return prompt, full[len(prompt) :]


_worker_encoder: Encoder | None = None


def init_worker(encoder: Encoder) -> None:
    """Worker initializer: this worker's unpickled copy of the converter's Encoder, tokenizer threads
    off (the processes are the parallelism). Ctrl-C is left to the parent, which ends the pool: each worker
    would otherwise print its own traceback."""
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_encoder
    _worker_encoder = encoder


def encode_in_worker(records: list[Record]) -> list[Any]:
    """Worker task: encode a chunk of records with this worker's Encoder."""
    assert _worker_encoder is not None, "init_worker was not run"
    return _worker_encoder.encode(records)
