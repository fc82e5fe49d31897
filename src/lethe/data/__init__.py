"""Data pipeline: corpora (stdlib / Hub / local files), tokenizers, cached token streams, LMDataModule."""

from lethe.data.cache import TokenBlocks, TokenCache
from lethe.data.corpus import SPLITS, Corpus
from lethe.data.datamodule import BlockStream, EvalShard, LMDataModule, block_permutation
from lethe.data.sources import open_corpus
from lethe.data.tokenizer import EOS, build_tokenizer, byte_tokenizer, load_tokenizer, tokenizer_fingerprint, train_bpe

__all__ = [
    "EOS", "SPLITS", "BlockStream", "Corpus", "EvalShard", "LMDataModule", "TokenBlocks", "TokenCache",
    "block_permutation", "build_tokenizer", "byte_tokenizer", "load_tokenizer", "open_corpus",
    "tokenizer_fingerprint", "train_bpe",
]
