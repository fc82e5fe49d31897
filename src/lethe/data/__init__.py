"""Data pipeline: corpora (stdlib / Hub / local files), tokenizers, cached token streams, LMDataModule.

The names below load their module on first use (PEP 562): a tokenizer or a checkpoint can be
read without importing the datasets library, which a GPU machine may not have.
"""

import importlib

_HOMES = {
    "TokenBlocks": "cache", "TokenCache": "cache",
    "SPLITS": "corpus", "Corpus": "corpus",
    "BlockStream": "datamodule", "EvalShard": "datamodule", "LMDataModule": "datamodule", "block_permutation": "datamodule",
    "open_corpus": "sources",
    "EOS": "tokenizer", "build_tokenizer": "tokenizer", "byte_tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "tokenizer_fingerprint": "tokenizer", "train_bpe": "tokenizer",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'lethe.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lethe.data.{_HOMES[name]}"), name)
