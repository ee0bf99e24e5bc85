"""Data: MDS conversion, StreamingDataset subclasses, collators, the loader builder and the tokenizer.

Public interface for the trainer: LoaderConfig, build_dataloader, load_tokenizer (a tokenizer folder or
'embedded'), mask_token_id, ensure_embedded_corpus. Conversion: ConvertConfig, convert
(scripts/convert_to_mds.py wraps them).

Modules, lowest layer first (each imports only from those above it): errors, synthetic (the generated
corpus), tokenizer, manifest, verify, sources, encode, embedded (the embedded tokenizer; resolves the name
'embedded'), convert, embedded_shards, config, collate, datasets, loader.
"""

from composer_dlm.data.collate import SFTCollator, collate_pretrain
from composer_dlm.data.config import LoaderConfig
from composer_dlm.data.convert import ConvertConfig, ConvertSummary, convert
from composer_dlm.data.datasets import PretrainDataset, SFTDataset
from composer_dlm.data.embedded import ensure_embedded_tokenizer, resolve_tokenizer
from composer_dlm.data.embedded_shards import ensure_embedded_corpus
from composer_dlm.data.errors import DataError
from composer_dlm.data.loader import build_dataloader
from composer_dlm.data.sources import Fields
from composer_dlm.data.tokenizer import LLADA_MASK_TOKEN_ID, MASK_TOKEN, mask_token_id

load_tokenizer = resolve_tokenizer  # the public loader: 'embedded' or a tokenizer folder

__all__ = [
    "LLADA_MASK_TOKEN_ID",
    "MASK_TOKEN",
    "ConvertConfig",
    "ConvertSummary",
    "DataError",
    "Fields",
    "LoaderConfig",
    "PretrainDataset",
    "SFTCollator",
    "SFTDataset",
    "build_dataloader",
    "collate_pretrain",
    "convert",
    "ensure_embedded_corpus",
    "ensure_embedded_tokenizer",
    "load_tokenizer",
    "mask_token_id",
    "resolve_tokenizer",
]
