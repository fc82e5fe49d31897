"""What a corpus is, how its held-out splits are carved, and the embedded default corpus.

A `Corpus` is cheap to create: it knows its fingerprint (a stable hash of the documents and the
split rules) without reading documents into Arrow; `load()` materializes the documents of every
split only when a token cache has to be built or a BPE tokenizer trained.

The default corpus is the source code of the running interpreter's standard library: always
present, no network, several MB of human-written code. Each file is one document; the split is
by hash of the file's relative path, so it is stable across runs and machines.
"""

import hashlib
import json
import logging
import platform
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from lethe.data.fingerprint import digest
from lethe.errors import ConfigError, DataError
from lethe.files import atomic_write

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class Corpus:
    name: str  # for humans and logs, e.g. "stdlib (cpython 3.11.7)"
    fingerprint: str  # changes iff the documents or the split rules change
    loader: Callable[[], dict]  # -> {"train"|"val"|"test": datasets.Dataset with a "text" column}
    _splits: dict = field(default=None, repr=False)

    def load(self) -> dict:
        if self._splits is None:
            self._splits = self.loader()
        return self._splits


# ---- held-out splits by document hash --------------------------------------------------------
# For a source that does not say; each data config states its own (conf/data/*.yaml, with why).
DEFAULT_HOLDOUT = {"val": 0.05, "test": 0.05}


def holdout_with_defaults(holdout: dict | None) -> dict:
    return check_holdout({**DEFAULT_HOLDOUT, **(holdout or {})})


def check_holdout(holdout: dict) -> dict:
    """holdout: {"val": x, "test": y}; a float in [0, 1) is a fraction, an int a document count."""
    if set(holdout) - {"val", "test"}:
        raise ConfigError(f"data.source.holdout has keys {sorted(holdout)}; only 'val' and 'test' are allowed")
    for split, x in holdout.items():
        fraction_ok = isinstance(x, float) and 0.0 <= x < 1.0
        if not (fraction_ok or (isinstance(x, int) and not isinstance(x, bool) and x >= 0)):
            raise ConfigError(f"data.source.holdout.{split}={x!r}: use a fraction in [0, 1) (e.g. 0.005) or a document count (e.g. 500)")
    fractions = [x for x in holdout.values() if isinstance(x, float)]
    if sum(fractions) >= 1.0:
        raise ConfigError(f"data.source.holdout fractions sum to {sum(fractions)}; they must leave documents for training")
    return holdout


def document_hashes(ds: datasets.Dataset, column: str) -> np.ndarray:
    """64-bit blake2b of each row's `column`, as uint64 (stable across runs, machines, versions)."""
    digests = b"".join(
        hashlib.blake2b(text.encode(), digest_size=8).digest()
        for batch in tqdm(ds.iter(batch_size=10_000), desc="hash documents", total=-(-len(ds) // 10_000), leave=False)
        for text in batch[column]
    )
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def _threshold(fraction: float) -> np.uint64:
    return np.uint64(min(int(fraction * 2**64), 2**64 - 1))


def carve(pool: datasets.Dataset, holdout: dict, key_column: str = "text") -> dict:
    """Split `pool` into "train" plus the splits named in `holdout` by the hash of each document's
    `key_column`: independent of document order, identical texts land in the same
    split (no leakage of duplicates), and train/val/test are disjoint. Fractions take the documents
    whose hash falls in a fixed interval; counts take the documents with the lowest hashes."""
    if len(pool) == 0:
        return {"train": pool, **{split: pool for split in holdout}}
    h = document_hashes(pool, key_column)
    taken = np.zeros(len(h), dtype=bool)
    order = np.argsort(h, kind="stable")
    parts, low = {}, 0.0
    for split in ("val", "test"):
        x = holdout.get(split)
        if x is None:
            continue
        if isinstance(x, float):  # hash interval [low, low + x) of the unit range
            chosen = (h >= _threshold(low)) & (h < _threshold(low + x)) & ~taken
            low += x
        else:  # the x untaken documents with the lowest hashes
            chosen = np.zeros(len(h), dtype=bool)
            chosen[order[~taken[order]][:x]] = True
        taken |= chosen
        parts[split] = pool.select(np.flatnonzero(chosen))  # flatnonzero keeps the pool's order
    parts["train"] = pool.select(np.flatnonzero(~taken))
    return parts


# ---- writing documents to an Arrow file (memory-mapped by datasets, bounded memory) -------------
def write_documents(texts, path: Path, desc: str, total=None) -> datasets.Dataset:
    """Stream an iterable of strings into an Arrow file at `path` (atomically, lethe.files, so a
    crash never leaves half a file) and open it memory-mapped as a datasets.Dataset."""
    path = Path(path)
    if not path.exists():
        schema = pa.schema({"text": pa.string()})
        with atomic_write(path) as sink, pa.ipc.new_stream(sink, schema) as writer:
            batch = []
            for text in tqdm(texts, desc=desc, unit=" docs", total=total):
                batch.append(text)
                if len(batch) == 1000:
                    writer.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))
                    batch = []
            if batch:
                writer.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))
    return datasets.Dataset.from_file(str(path))


# ---- the embedded default corpus: the Python standard library's source ------------------------
# Test suites, installed packages and generated code (codec tables, pydoc topics, build config)
# are left out, so what remains is human-written library code.
STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}
STDLIB_EXCLUDED_PREFIXES = ("_sysconfigdata", "config-")


def stdlib_files(root: Path, max_bytes=None) -> list:
    """Relative paths (sorted) of the stdlib's *.py library files; with max_bytes, a deterministic
    subset: files in order of the hash of their path, as long as the running total stays <= max_bytes."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if STDLIB_EXCLUDED_DIRS & set(rel.parts[:-1]) or any(p.startswith(STDLIB_EXCLUDED_PREFIXES) for p in rel.parts):
            continue
        files.append(rel.as_posix())
    files.sort()
    if max_bytes is not None:
        kept, total = [], 0
        for rel in sorted(files, key=lambda r: digest(r)):
            size = (root / rel).stat().st_size
            if total + size <= max_bytes:
                kept.append(rel)
                total += size
        files = sorted(kept)
    return files


def stdlib_corpus(cache_dir=None, undecodable: str = "skip", /, *, root: str | None = None, max_bytes: int | None = None,
                  holdout: dict | None = None) -> Corpus:
    """The source of the running interpreter's standard library (data=stdlib, the default);
    `cache_dir` is unused: the files are read in place."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"stdlib corpus root {root} is not a directory; set data.source.root to a Python Lib/ directory or leave it null")
    holdout = holdout_with_defaults(holdout)
    rels = stdlib_files(root, max_bytes)
    contents = [(root / rel).read_bytes() for rel in rels]
    # Python version is part of the name and the hash: numbers from different stdlibs never mix.
    version = f"{platform.python_implementation().lower()}{platform.python_version()}"
    h = hashlib.blake2b(digest_size=16)
    for rel, data in zip(rels, contents):
        h.update(rel.encode() + b"\x00" + len(data).to_bytes(8, "little") + data)
    fingerprint = f"stdlib-{version}-" + digest(h.hexdigest(), holdout, sys.version_info[:3], size=8)

    def load():
        texts, paths, bad = [], [], []
        for rel, data in zip(rels, contents):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                if undecodable == "error":
                    raise DataError(f"{root / rel} is not valid UTF-8 ({e.reason} at byte {e.start}); set data.undecodable=skip to skip such files") from None
                bad.append(rel)
                continue
            if text.strip():
                texts.append(text)
                paths.append(rel)
        if bad:
            log.warning("stdlib corpus: skipped %d file(s) that are not valid UTF-8 (data.undecodable=skip): %s", len(bad), ", ".join(bad[:5]))
        pool = datasets.Dataset.from_dict({"text": texts, "path": paths})
        return carve(pool, holdout, "path")  # (the extra "path" column is dropped when tokenizing)

    total = sum(map(len, contents))
    name = f"stdlib ({version}, {len(rels)} files, {total / 1e6:.1f} MB)"
    return Corpus(name, fingerprint, load)
