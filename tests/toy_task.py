"""A toy task shared by the likelihood, callback and CLI tests: after the prompt ``t{s}`` the answer is the next
four numbers, ``t{s+1} t{s+2} t{s+3} t{s+4}`` (mod 20). A tiny LLaDA learns it in a few hundred steps on a CPU,
so a correct answer and a scrambled one are told apart by likelihood, and greedy sampling reproduces it.

The tokenizer is word-level (one token per whitespace-separated word) with LLaDA's special tokens and our chat
template, saved to a folder so that it loads through ``composer_dlm.data.load_tokenizer``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from composer_dlm.data.tokenizer import CHAT_TEMPLATE
from composer_dlm.models import LLaDAModel

NUMBERS = 20
ANSWER_LENGTH = 4
SPECIAL = [
    "<|endoftext|>",
    "<|startoftext|>",
    "<|mdm_mask|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
WORDS = [*SPECIAL, "user", "assistant", *(f"t{i}" for i in range(NUMBERS))]
EOS, MASK = 0, 2
FIRST_NUMBER = WORDS.index("t0")
VOCAB_SIZE = 32  # >= len(WORDS)


def token(number: int) -> int:
    return FIRST_NUMBER + number % NUMBERS


def answer(start: int) -> list[int]:
    return [token(start + i) for i in range(1, ANSWER_LENGTH + 1)]


def words(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids)


def tokenizer_folder(folder: Path) -> Path:
    """Writes the word-level tokenizer to ``folder`` and returns it."""
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        mask_token="<|mdm_mask|>",
        additional_special_tokens=SPECIAL[3:],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


def fresh_model(seed: int = 0) -> LLaDAModel:
    config = dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, vocab_size=VOCAB_SIZE,
                  mask_token_id=MASK, eos_token_id=EOS, max_sequence_length=64)  # fmt: skip
    return LLaDAModel.from_config(config, seed=seed)


@functools.cache
def trained_model(steps: int = 300, batch: int = 64) -> LLaDAModel:
    """The tiny LLaDA trained on the task with the SFT masked-diffusion loss (answer tokens masked with
    probability t ~ U(0, 1), cross-entropy / t). Deterministic; built once per test session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest, and immune to other load on the machine
    try:
        return _train(steps, batch)
    finally:
        torch.set_num_threads(threads)


def _train(steps: int, batch: int) -> LLaDAModel:
    model = fresh_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, NUMBERS, (batch,), generator=g)
        seq = torch.tensor([[token(s), *answer(s)] for s in starts.tolist()])
        t = torch.rand((batch, 1), generator=g).clamp_min(1e-3)
        masked = torch.rand((batch, ANSWER_LENGTH), generator=g) < t
        noisy = seq.clone()
        noisy[:, 1:][masked] = MASK
        logits = model(noisy)[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), seq[:, 1:].reshape(-1), reduction="none")
        loss = (ce.view(batch, -1) * masked / t).sum() / (batch * ANSWER_LENGTH)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
