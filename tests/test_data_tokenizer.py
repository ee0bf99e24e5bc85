"""Tokenizer loading: local folders only, a guaranteed mask token, LLaDA's mask id, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from composer_dlm.data import LLADA_MASK_TOKEN_ID, MASK_TOKEN, DataError, load_tokenizer, mask_token_id
from composer_dlm.data.tokenizer import tokenizer_fingerprint, train_bpe_tokenizer

TEXTS = ["a masked diffusion model fills in masked tokens", "the sampler unmasks tokens step by step"] * 20


def test_trained_tokenizer_has_special_tokens_first_and_round_trips(tmp_path: Path) -> None:
    tok = train_bpe_tokenizer(TEXTS, vocab_size=300)
    assert [tok.eos_token_id, tok.bos_token_id, tok.mask_token_id] == [0, 1, 2]
    text = "Unseen words, ümlauts and 中文 survive: byte-level BPE is lossless.\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.encode("the", add_special_tokens=True) == tok.encode("the", add_special_tokens=False)
    tok.save_pretrained(str(tmp_path / "t"))
    loaded = load_tokenizer(str(tmp_path / "t"))
    assert mask_token_id(loaded) == 2 and loaded.mask_token == MASK_TOKEN
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(train_bpe_tokenizer(TEXTS, vocab_size=290)) != tokenizer_fingerprint(tok)


def test_llada_shaped_vocabulary_gives_126336(tmp_path: Path) -> None:
    """A tokenizer laid out like LLaDA's: <|mdm_mask|> at 126336 in the vocabulary, no mask_token set."""
    vocab = {f"tok{i}": i for i in range(126464)}
    vocab["<|endoftext|>"] = vocab.pop("tok126081")
    vocab[MASK_TOKEN] = vocab.pop(f"tok{LLADA_MASK_TOKEN_ID}")
    backend = Tokenizer(models.WordLevel(vocab, unk_token="tok0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(
        str(tmp_path / "llada")
    )
    assert json.loads((tmp_path / "llada" / "special_tokens_map.json").read_text()).get("mask_token") is None
    tok = load_tokenizer(str(tmp_path / "llada"))
    assert mask_token_id(tok) == LLADA_MASK_TOKEN_ID == 126336
    assert tok.mask_token == MASK_TOKEN and tok.mask_token_id == 126336


def test_an_unknown_token_is_not_taken_for_the_mask() -> None:
    """Without <|mdm_mask|> in the vocabulary, looking it up gives the unknown token: not the mask."""
    vocab = {"<unk>": 0, "<|endoftext|>": 1, "[MASK]": 2, "a": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", mask_token="[MASK]")
    assert tok.convert_tokens_to_ids(MASK_TOKEN) == 0  # what a bare lookup says
    assert mask_token_id(tok) == 2
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(DataError, match="has no mask token"):
        mask_token_id(tok)


def test_tokenizer_without_mask_token_is_a_clear_error(tmp_path: Path) -> None:
    train_bpe_tokenizer(TEXTS, vocab_size=300, mask=False).save_pretrained(str(tmp_path / "nomask"))
    with pytest.raises(DataError, match=r"nomask.*has no mask token.*add_special_tokens"):
        load_tokenizer(str(tmp_path / "nomask"))


def test_missing_or_broken_tokenizer_folder(tmp_path: Path) -> None:
    with pytest.raises(
        DataError,
        match=r"'GSAI-ML/LLaDA-8B-Base' is neither a local folder nor in the Hugging Face cache; nothing is downloaded",
    ):
        load_tokenizer("GSAI-ML/LLaDA-8B-Base")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("not a tokenizer")
    with pytest.raises(DataError, match=r"junk: could not load a Hugging Face tokenizer"):
        load_tokenizer(str(tmp_path / "junk"))
