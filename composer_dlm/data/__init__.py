"""Data: MDS conversion, StreamingDataset subclasses, collators, the loader builder and the tokenizer.

Public interface for the trainer: LoaderConfig, build_dataloader, load_tokenizer, mask_token_id,
ensure_embedded_corpus. Conversion: ConvertConfig, convert (scripts/convert_to_mds.py wraps them).
"""

from composer_dlm.data.collate import SFTCollator, collate_pretrain
from composer_dlm.data.config import LoaderConfig
from composer_dlm.data.convert import ConvertConfig, ConvertSummary, convert
from composer_dlm.data.datasets import PretrainDataset, SFTDataset
from composer_dlm.data.embedded import ensure_embedded_corpus, ensure_embedded_tokenizer
from composer_dlm.data.errors import DataError
from composer_dlm.data.loader import build_dataloader
from composer_dlm.data.sources import Fields
from composer_dlm.data.tokenizer import LLADA_MASK_TOKEN_ID, MASK_TOKEN, load_tokenizer, mask_token_id

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
]
