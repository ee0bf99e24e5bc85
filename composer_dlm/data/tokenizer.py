"""Tokenizers: load one from a local folder (never the network), find its mask token, train a small one.

Masked diffusion needs a reserved mask id that never occurs in data. LLaDA's tokenizer has the token
`<|mdm_mask|>` at id 126336; ours (the embedded one and those the tests train) has the same token.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from composer_dlm.data.errors import DataError
from composer_dlm.models.hf_format import CheckpointError, resolve_folder

EMBEDDED = "embedded"
MASK_TOKEN = "<|mdm_mask|>"
LLADA_MASK_TOKEN_ID = 126336  # where LLaDA's tokenizer keeps MASK_TOKEN
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# LLaDA-style turns: <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>, BOS before the first.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and bos_token %}{{ bos_token }}{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a Hugging Face tokenizer folder ('embedded' is resolved a layer above, in data/embedded.py).

    A hub id (``GSAI-ML/LLaDA-8B-Base``) is read from huggingface_hub's cache. Never downloads. The result is
    guaranteed to have a mask token: `tokenizer.mask_token` is set to
    `<|mdm_mask|>` when the vocabulary has it but the tokenizer config does not name it (LLaDA's case).
    Raises DataError for a missing folder, an unloadable one, or a tokenizer without a mask token.
    """
    try:  # a hub id (GSAI-ML/LLaDA-8B-Base) is read from huggingface_hub's cache
        path = resolve_folder(name_or_path, "tokenizer")
    except CheckpointError as err:
        raise DataError(str(err)) from None
    if not path.is_dir():
        raise DataError(
            f"tokenizer {name_or_path!r}: no such folder. Give 'embedded' or the path of a local "
            "Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json); nothing is "
            "downloaded, so fetch a hub tokenizer beforehand (e.g. `huggingface-cli download "
            "GSAI-ML/LLaDA-8B-Base --local-dir DIR`)."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(
            f"tokenizer folder {path}: could not load a Hugging Face tokenizer from it ({e}). It needs "
            "tokenizer.json or the files of a slow tokenizer, plus tokenizer_config.json."
        ) from e
    mask_id = mask_token_id(tokenizer, name=str(name_or_path))
    if tokenizer.mask_token is None:
        tokenizer.mask_token = tokenizer.convert_ids_to_tokens(mask_id)
    return tokenizer


def mask_token_id(tokenizer: PreTrainedTokenizerBase, *, name: str | None = None) -> int:
    """The id of the mask token: `<|mdm_mask|>` if the vocabulary has it, else `tokenizer.mask_token_id`.

    For LLaDA's tokenizer this is 126336. Raises DataError if the tokenizer has neither. Looks the token up
    rather than building the vocabulary (half a second for LLaDA's); an absent token gives the unknown token's
    id or None, which the round trip tells apart.
    """
    vocab_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if isinstance(vocab_id, int) and tokenizer.convert_ids_to_tokens(vocab_id) == MASK_TOKEN:
        return vocab_id
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    label = name or getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise DataError(
        f"tokenizer {label!r} has no mask token: neither {MASK_TOKEN!r} in its vocabulary nor a mask_token. "
        f"Masked diffusion needs a reserved id: add one with tokenizer.add_special_tokens("
        f"{{'mask_token': {MASK_TOKEN!r}}}), save the folder with save_pretrained, and size the model's "
        "vocabulary to len(tokenizer); or use LLaDA's tokenizer or 'embedded'."
    )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary (token -> id, added tokens included) to tell tokenizers apart."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def train_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 4096,
    eos: bool = True,
    bos: bool = True,
    mask: bool = True,
    chat: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (deterministic for the same texts in the same order).

    Special tokens come first, in this order: EOS `<|endoftext|>`, BOS `<|startoftext|>`, mask
    `<|mdm_mask|>`, then the chat tokens and CHAT_TEMPLATE. The flags leave any of them out (tests use
    that to build tokenizers without an EOS, a BOS, a mask or a chat template). Byte-level BPE decodes
    every string back exactly, and no post-processor adds tokens on encode.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = [t for t, keep in ((EOS_TOKEN, eos), (BOS_TOKEN, bos), (MASK_TOKEN, mask)) if keep]
    if chat:
        special += CHAT_TOKENS
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN if eos else None,
        bos_token=BOS_TOKEN if bos else None,
        mask_token=MASK_TOKEN if mask else None,
        chat_template=CHAT_TEMPLATE if chat else None,
        clean_up_tokenization_spaces=False,
    )


def user_turn(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """``prompt`` as one user turn of the tokenizer's chat template, ending where the assistant's answer starts
    (how an SFT model saw its prompts in training)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    assert isinstance(text, str)  # tokenize=False renders text
    return text
