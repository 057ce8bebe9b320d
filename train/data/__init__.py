"""Data pipeline: tokenizers, corpora, token shards and the data-parallel loaders (see loader.py)."""

from train.data.config import DataConfig
from train.data.errors import DataError, DataPathNotFoundError
from train.data.loader import build_dataloader
from train.data.tokenizer import Tokenizer, get_tokenizer

__all__ = ["DataConfig", "DataError", "DataPathNotFoundError", "Tokenizer", "build_dataloader", "get_tokenizer"]
