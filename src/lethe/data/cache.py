"""Tokenize a split, pack it into one token stream, cache it as a memory-mapped array.

Stream: doc_1 <eos> doc_2 <eos> ... doc_n (a separator *between* documents). The stream is
independent of seq_len; `TokenBlocks` cuts it into blocks of seq_len + 1 tokens at stride
seq_len (input = block[:-1], labels = block[1:]), so block i and i+1 share one token and every
token except the first is predicted exactly once.

Where each document starts is recorded beside the stream, not inferred from <eos> (a tokenizer
may also produce its eos id inside a text): document 1 starts at 0, document k > 1 at the
separator before it. The separator belongs to the document it opens: as an input it predicts
that document's first token from nothing else (a BOS), while the previous document's last
token still predicts it as its end. With data.cross_document=false every block carries these
starts and every layer resets at them.

On disk: cache_dir/tokens/<corpus fingerprint>/<split>-<tokenizer fingerprint>.bin (raw uint16
when the vocabulary fits, else uint32), .starts (int64 stream positions, ascending) and a .json
sidecar with the counts. All are written atomically (lethe.files), the sidecar last; a cache
counts only when all are there and agree, so a crash never leaves a half cache that a later run
would trust.
"""

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from lethe.data.fingerprint import digest
from lethe.data.tokenizer import document_encoder
from lethe.files import atomic_write, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: document starts recorded (.starts)
MIN_DOCS_PER_PROCESS = 5000
PACK_BATCH = 8192  # documents packed per write


def token_dtype(vocab_size: int):
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclass
class TokenCache:
    path: Path  # the .bin file
    dtype: np.dtype
    num_tokens: int
    num_documents: int

    @property
    def starts_path(self) -> Path:
        return starts_path(self.path)

    def array(self) -> np.ndarray:
        if self.num_tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    def document_starts(self) -> np.ndarray:
        """Stream positions where documents start, ascending (int64, num_documents of them)."""
        if self.num_documents == 0:
            return np.zeros(0, dtype=np.int64)
        return np.memmap(self.starts_path, dtype=np.int64, mode="r", shape=(self.num_documents,))


def starts_path(path: Path) -> Path:
    """Where the document starts of the stream at `path` (a .bin) are kept."""
    return path.with_suffix(".starts")


def cache_path(cache_dir, corpus_fingerprint: str, split: str, tokenizer_fp: str, max_tokens=None) -> Path:
    cap = "" if max_tokens is None else f"-max{max_tokens}"
    key = digest(FORMAT_VERSION, corpus_fingerprint, split, tokenizer_fp, max_tokens, size=4)
    return Path(cache_dir) / "tokens" / corpus_fingerprint / f"{split}-{tokenizer_fp}{cap}-{key}.bin"


def load_cache(path: Path):
    """The cache at `path` if complete, else None."""
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        return None
    meta = json.loads(sidecar.read_text())
    dtype = np.dtype(meta["dtype"])
    cache = TokenCache(path, dtype, meta["num_tokens"], meta["num_documents"])
    if meta.get("format") != FORMAT_VERSION or path.stat().st_size != meta["num_tokens"] * dtype.itemsize:
        return None
    if not cache.starts_path.is_file() or cache.starts_path.stat().st_size != meta["num_documents"] * 8:
        return None
    return cache


class _EncodeBatch:
    """datasets.map function (picklable for num_proc > 1): documents -> token id arrays. Blank
    documents are dropped: they would only add runs of separators."""

    def __init__(self, encoder: Tokenizer, dtype):
        self.encoder_json, self.dtype, self._encoder = encoder.to_str(), dtype, encoder

    def __getstate__(self):
        return {"encoder_json": self.encoder_json, "dtype": self.dtype, "_encoder": None}

    def __call__(self, batch):
        if self._encoder is None:
            self._encoder = Tokenizer.from_str(self.encoder_json)
            self._encoder.encode_special_tokens = True
        encode = getattr(self._encoder, "encode_batch_fast", self._encoder.encode_batch)
        texts = [t for t in batch["text"] if t and not t.isspace()]
        encodings = encode(texts, add_special_tokens=False)
        return {"ids": [np.asarray(e.ids, dtype=self.dtype) for e in encodings if e.ids]}


def build_cache(docs: datasets.Dataset, tokenizer, path: Path, meta: dict, num_proc: int = 1, max_tokens=None) -> TokenCache:
    """Tokenize `docs` (a "text" column) with datasets.map, pack with eos separators, write `path`."""
    start = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(len(tokenizer))
    eos = tokenizer.eos_token_id
    work = path.parent / f".work-{path.stem}-{os.getpid()}"
    try:
        work.mkdir(exist_ok=True)
        ids = docs.map(
            _EncodeBatch(document_encoder(tokenizer), dtype), batched=True, batch_size=256,
            # a worker pool costs ~1s to start: only worth it for large splits (tokenizers is multithreaded anyway)
            num_proc=num_proc if num_proc > 1 and len(docs) >= MIN_DOCS_PER_PROCESS * num_proc else None,
            remove_columns=docs.column_names,
            features=datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype.name))}),
            cache_file_name=str(work / "ids.arrow"), load_from_cache_file=False,
            new_fingerprint=digest(path.name, size=8), desc=f"tokenize {meta.get('split', '')}",
        )
        with atomic_write(path) as f, atomic_write(starts_path(path)) as starts_file:
            num_tokens, num_documents = _write_stream(ids, f, starts_file, dtype, eos, max_tokens, meta.get("split", ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"format": FORMAT_VERSION, "dtype": dtype.name, "num_tokens": num_tokens, "num_documents": num_documents,
            "eos_token_id": eos, "max_tokens": max_tokens, "build_seconds": round(time.time() - start, 2), **meta}
    write_json(path.with_suffix(".json"), meta)  # last: the cache counts only once its sidecar is there
    log.info("cached %s: %d tokens from %d documents in %.1fs", path, num_tokens, num_documents, meta["build_seconds"])
    return TokenCache(path, dtype, num_tokens, num_documents)


def _write_stream(ids: datasets.Dataset, f, starts_file, dtype, eos: int, max_tokens, split: str):
    """Append every document's ids and an eos to the binary file `f`, and where each document
    starts (int64) to `starts_file`; drop the final eos (separators go between documents). With
    max_tokens, stop after exactly that many tokens."""
    written = documents = 0
    capped = False
    with tqdm(total=len(ids), desc=f"pack {split}", unit=" docs") as bar:
        for table in ids.with_format("arrow").iter(batch_size=PACK_BATCH):
            column = table.column("ids").combine_chunks()
            lengths = column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
            stream = np.insert(column.flatten().to_numpy(zero_copy_only=False), np.cumsum(lengths), eos).astype(dtype)
            # a document opens at the separator before it (the first of the stream at 0)
            starts = written + np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]) - 1
            starts[0] = max(starts[0], 0)
            if max_tokens is not None and written + len(stream) >= max_tokens:
                stream = stream[: max_tokens - written]
                kept = starts < written + len(stream)
                lengths, starts = lengths[kept], starts[kept]
                capped = True
            stream.tofile(f)
            starts.astype(np.int64).tofile(starts_file)
            written += len(stream)
            documents += len(lengths)
            bar.update(table.num_rows)
            if capped:
                break
        if written and not capped:  # the trailing separator
            written -= 1
            f.truncate(written * dtype.itemsize)
    return written, documents


class TokenBlocks(torch.utils.data.Dataset):
    """Non-overlapping training examples from a cached stream: block i is tokens
    [i*seq_len, (i+1)*seq_len] (seq_len + 1 tokens); len = (num_tokens - 1) // seq_len.

    With `document_starts`, each example also has "document_starts" (seq_len,) bool: true at the
    inputs where a document starts (the model resets there)."""

    def __init__(self, cache: TokenCache, seq_len: int, document_starts: bool = False):
        self.cache, self.seq_len, self.with_starts = cache, seq_len, document_starts
        self._tokens = self._starts = None  # opened lazily: DataLoader workers map the files, not pickle them

    def __len__(self):
        return max(0, (self.cache.num_tokens - 1) // self.seq_len)

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None, "_starts": None}

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range (0..{len(self) - 1})")
        if self._tokens is None:
            self._tokens, self._starts = self.cache.array(), self.cache.document_starts()
        begin, end = i * self.seq_len, (i + 1) * self.seq_len
        block = torch.from_numpy(self._tokens[begin : end + 1].astype(np.int64))
        example = {"input_ids": block[:-1], "labels": block[1:]}
        if self.with_starts:
            inside = self._starts[np.searchsorted(self._starts, begin) : np.searchsorted(self._starts, end)]
            starts = torch.zeros(self.seq_len, dtype=torch.bool)
            starts[torch.from_numpy(inside - begin)] = True
            example["document_starts"] = starts
        return example

