"""Corpora from the Hugging Face Hub and from local files (the stdlib corpus is in corpus.py).

The `data.source` config node names one of the corpus functions and its settings; the data module
calls it with the cache directory and the undecodable policy:

  lethe.data.corpus.stdlib_corpus: root (null = this interpreter's stdlib), max_bytes, holdout
  hub_corpus:   id, config, revision, splits {train, val, test: source split name or null},
                streaming, max_documents, text_column, documents, holdout
  local_corpus: path (file, directory, glob, list of those, or {train, val, test: ...}),
                text_column, sample_by (txt: line|paragraph|document), max_documents, documents,
                holdout
A split that the source lacks (null in `splits`, or not given for local files) is carved from the
training documents by document hash (`holdout`: a fraction or a document count per split).
"""

import codecs
import glob
import hashlib
import logging
import os
import re
from pathlib import Path

import datasets

from lethe.files import write_bytes
from lethe.config import as_target_spec, instantiate
from lethe.data.corpus import SPLITS, Corpus, carve, holdout_with_defaults, write_documents
from lethe.data.fingerprint import digest
from lethe.errors import ConfigError, DataError, first_line

log = logging.getLogger(__name__)

DOCUMENT_MODES = ("rows", "wikitext_articles")
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # anything else is plain text
# `data.source.kind: ...`, the form checkpoints written before sources became `_target_`s carry
LEGACY_KINDS = {"stdlib": "lethe.data.corpus.stdlib_corpus", "hub": "lethe.data.sources.hub_corpus",
                "local": "lethe.data.sources.local_corpus"}


def open_corpus(spec: dict, cache_dir, undecodable: str = "skip") -> Corpus:
    """The corpus a `data.source` spec names (its settings checked by name)."""
    spec = as_target_spec(spec, LEGACY_KINDS, "data.source")
    if "_target_" not in spec:
        raise ConfigError("data.source has no _target_; choose a data group (data=stdlib, data=local, data=wikitext-103, ...)")
    return instantiate(spec, config_key="data.source", _partial_=True, _convert_="all")(cache_dir, undecodable)


def _check_documents(documents: str) -> None:
    if documents not in DOCUMENT_MODES:
        raise ConfigError(f"data.source.documents={documents!r}; choose one of {', '.join(DOCUMENT_MODES)}")


# ---- shared finishing: text column, document grouping, document cap, carving --------------------
def _text_only(ds, column: str, where: str):
    names = ds.column_names if ds.column_names is not None else list(ds.features or [])
    if names and column not in names:  # (a stream may not know its columns before reading)
        raise DataError(f"{where} has no column '{column}' (columns: {', '.join(names)}); set data.source.text_column")
    if column != "text":
        ds = ds.rename_column(column, "text")
    return ds.select_columns(["text"])


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext_articles(rows):
    """Group WikiText's line rows into articles (a level-1 ' = Title = ' row starts one); the
    dataset stores blank lines as empty rows, restored here as newlines."""
    article = []
    for row in rows:
        if article and _WIKITEXT_TITLE.match(row.rstrip("\n")):
            yield "".join(article)
            article = []
        article.append(row or "\n")
    if article:
        yield "".join(article)


def _iter_texts(ds):
    if isinstance(ds, datasets.IterableDataset):
        return (row["text"] for row in ds)
    return (text for batch in ds.iter(batch_size=1000) for text in batch["text"])


def _finish(given: dict, spec: dict, holdout: dict, raw_dir: Path) -> dict:
    """given: {split: Dataset | IterableDataset | None}; None means carve it from train."""
    out = {}
    for split, ds in given.items():
        if ds is None:
            continue
        n = spec.get("max_documents")
        streamed = isinstance(ds, datasets.IterableDataset)
        if n is not None and not streamed:
            ds = ds.select(range(min(n, len(ds))))
        elif n is not None:
            ds = ds.take(n)
        if spec.get("documents", "rows") == "wikitext_articles":
            ds = write_documents(wikitext_articles(_iter_texts(ds)), raw_dir / f"{split}-articles.arrow", f"group {split} articles")
        elif streamed:  # snapshot the bounded stream once; later runs read the Arrow file
            ds = write_documents(_iter_texts(ds), raw_dir / f"{split}.arrow", f"stream {split}", total=n)
        out[split] = ds
    missing = {s: holdout[s] for s in ("val", "test") if given.get(s) is None}
    if missing:
        out.update(carve(out["train"], missing))
    return out


# ---- Hugging Face Hub ---------------------------------------------------------------------
def hub_corpus(cache_dir, undecodable: str = "skip", /, *, id: str, config: str | None = None, revision: str | None = None,
               splits: dict | None = None, streaming: bool = False, max_documents: int | None = None,
               text_column: str = "text", documents: str = "rows", holdout: dict | None = None) -> Corpus:
    """A Hub dataset by id (data=wikitext-103, tinystories, fineweb-edu-10bt)."""
    spec = {"id": id, "config": config, "revision": revision, "splits": splits, "streaming": streaming,
            "max_documents": max_documents, "text_column": text_column, "documents": documents}
    _check_documents(documents)
    holdout, cache_dir = holdout_with_defaults(holdout), Path(cache_dir)
    if not spec.get("id"):
        raise ConfigError("data.source.id is empty; give a Hub dataset id such as roneneldan/TinyStories")
    splits = {"train": "train", "val": "validation", "test": "test", **(spec.get("splits") or {})}
    if set(splits) - set(SPLITS) or not splits["train"]:
        raise ConfigError(f"data.source.splits={splits}; keys are train/val/test, values a source split name or null, train required")
    if spec.get("streaming") and spec.get("max_documents") is None:
        raise ConfigError("data.source.streaming=true needs data.source.max_documents (how many documents to take per split)")
    keys = ("id", "config", "revision", "streaming", "max_documents", "text_column", "documents")
    carved = {s: holdout[s] for s in ("val", "test") if not splits.get(s)}
    identity = {k: spec.get(k) for k in keys} | {"splits": splits, "holdout": carved}
    fingerprint = "hub-" + digest(identity, size=8)
    raw_dir = cache_dir / "raw" / fingerprint

    def load():
        given = {split: _load_hub_split(spec, name) if name else None for split, name in splits.items()}
        given = {s: _text_only(ds, spec.get("text_column", "text"), f"hub dataset {spec['id']}") if ds is not None else None for s, ds in given.items()}
        return _finish(given, spec, holdout, raw_dir)

    name = spec["id"] + (f" ({spec['config']})" if spec.get("config") else "")
    return Corpus(name, fingerprint, load)


def _load_hub_split(spec, split: str):
    where = f"hub dataset '{spec['id']}'" + (f" config '{spec['config']}'" if spec.get("config") else "")
    try:
        return datasets.load_dataset(spec["id"], name=spec.get("config"), revision=spec.get("revision"), split=split, streaming=bool(spec.get("streaming")))
    except ConnectionError as e:
        raise DataError(
            f"cannot load {where}: the Hub is unreachable ({first_line(e)}); it needs network access or a local copy: "
            "pre-download it with network, set HF_HOME to that cache and HF_DATASETS_OFFLINE=1, or use data=local data.source.path=<files>"
        ) from None
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(f"cannot load {where}: {first_line(e)}; check data.source.id, or use data=local data.source.path=<files>") from None
    except (ValueError, FileNotFoundError) as e:  # unknown config or split name, missing files
        raise DataError(f"cannot load split '{split}' of {where}: {first_line(e)}; check data.source.config and data.source.splits") from None


# ---- local files ------------------------------------------------------------------------
def _resolve(patterns) -> list:
    """Files matched by a path, directory (all files below it) or glob, or a list of those."""
    files = []
    for pattern in [patterns] if isinstance(patterns, (str, os.PathLike)) else patterns:
        pattern = os.path.expanduser(str(pattern))
        if os.path.isdir(pattern):
            found = [p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True) if os.path.isfile(p)]
        else:
            found = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not found:
            raise DataError(f"data.source.path '{pattern}' matches no files; give an existing file or directory (glob patterns like data/*.jsonl are allowed)")
        files += sorted(os.path.abspath(p) for p in found)
    return list(dict.fromkeys(files))


def _file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def local_corpus(cache_dir, undecodable: str = "skip", /, *, path, text_column: str = "text", sample_by: str = "paragraph",
                 max_documents: int | None = None, documents: str = "rows", holdout: dict | None = None) -> Corpus:
    """Your own files (data=local): .txt (and any other extension) as plain text, .json/.jsonl
    and .parquet by a text column."""
    spec = {"text_column": text_column, "sample_by": sample_by, "max_documents": max_documents, "documents": documents}
    _check_documents(documents)
    holdout, cache_dir = holdout_with_defaults(holdout), Path(cache_dir)
    if not path:
        raise ConfigError("data.source.path is empty; give files, a directory or a glob (e.g. data.source.path='corpus/*.txt')")
    by_split = path if isinstance(path, dict) else {"train": path}
    if set(by_split) - set(SPLITS) or "train" not in by_split:
        raise ConfigError(f"data.source.path has keys {sorted(by_split)}; use train (required), val, test")
    files = {split: _resolve(p) for split, p in by_split.items()}
    if sample_by not in ("line", "paragraph", "document"):
        raise ConfigError(f"data.source.sample_by={sample_by!r}; choose line, paragraph or document")
    # Content, not location, identifies the corpus: the same files elsewhere give the same fingerprint.
    root = os.path.commonpath([os.path.dirname(f) for fs in files.values() for f in fs])
    contents = {s: [(os.path.relpath(f, root), _file_digest(f)) for f in fs] for s, fs in files.items()}
    keys = ("text_column", "sample_by", "max_documents", "documents")
    carved = {s: holdout[s] for s in ("val", "test") if s not in files}
    fingerprint = "local-" + digest(contents, {k: spec.get(k) for k in keys}, carved, size=8)
    raw_dir = cache_dir / "raw" / fingerprint

    def load():
        given = {s: (_load_local(files[s], spec, sample_by, cache_dir, undecodable) if s in files else None) for s in SPLITS}
        return _finish(given, spec, holdout, raw_dir)

    n = sum(map(len, files.values()))
    return Corpus(f"local files ({n} under {root})", fingerprint, load)


def _load_local(files, spec, sample_by, cache_dir, undecodable):
    groups = {}
    for f in files:
        groups.setdefault(BUILDERS.get(Path(f).suffix.lower(), "text"), []).append(f)
    parts, skipped, empty, units = [], 0, [], set()
    for builder, group in groups.items():
        unit = {"text": sample_by, "json": "line", "parquet": None}[builder]
        if unit:
            empty += [f for f in group if not _has_text(f)]
            group = [f for f in group if f not in empty]  # the datasets library fails on an empty file
            group, n = _utf8_files(group, unit, undecodable, cache_dir / "clean")
            skipped, units = skipped + n, units | ({unit} if n else set())
        if not group:
            continue
        kwargs = {"sample_by": sample_by} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=group, split="train", cache_dir=str(cache_dir / "hf"), **kwargs)
        except Exception as e:  # malformed JSON/Parquet surfaces as a DatasetGenerationError
            cause = e.__cause__ or e
            raise DataError(f"cannot read local {builder} files ({group[0]}{' ...' if len(group) > 1 else ''}): {first_line(cause)}; check the file format") from None
        parts.append(_text_only(ds, spec.get("text_column", "text"), f"local {builder} file(s) {group[0]}"))
    if skipped:
        log.warning("skipped %d undecodable (non-UTF-8) line(s)/document(s) in local files (data.undecodable=skip)", skipped)
    if empty:
        log.warning("skipped %d empty file(s): %s", len(empty), ", ".join(empty[:3]))
    if not parts:
        more = f" (and {len(files) - 1} more)" if len(files) > 1 else ""
        if skipped:
            raise DataError(f"{files[0]}{more}: nothing in it is UTF-8 text (all of it skipped: {skipped} "
                            f"{'/'.join(sorted(units))}(s) not valid UTF-8, data.undecodable=skip); give UTF-8 text files, "
                            "or data.undecodable=error to see the first bad byte")
        raise DataError(f"{files[0]}{more} is empty (no text); point data.source.path at files that hold documents")
    return datasets.concatenate_datasets(parts)


def _has_text(path: str) -> bool:
    """Whether a file holds anything but white space (read until the first such byte)."""
    with open(path, "rb") as f:
        return any(chunk.strip() for chunk in iter(lambda: f.read(1 << 20), b""))


def _utf8_files(files, unit: str, undecodable: str, clean_dir: Path):
    """Check that files are UTF-8. A bad file raises DataError (undecodable=error) or is replaced by
    a cleaned copy without its undecodable units (lines, paragraphs or whole documents)."""
    out, skipped = [], 0
    for f in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    decoder.decode(chunk)
            decoder.decode(b"", final=True)
            out.append(f)
            continue
        except UnicodeDecodeError:
            pass
        data = Path(f).read_bytes()
        if undecodable == "error":
            e = _decode_error(data)
            line = data.count(b"\n", 0, e.start) + 1
            raise DataError(f"{f} line {line} is not valid UTF-8 ({e.reason}); fix the file or set data.undecodable=skip to skip undecodable {unit}s")
        sep = {"line": b"\n", "paragraph": b"\n\n", "document": None}[unit]
        pieces = data.split(sep) if sep else [data]
        good = [p for p in pieces if _decode_error(p) is None]
        skipped += len(pieces) - len(good)
        if good:
            clean = clean_dir / digest(data, unit, size=8) / Path(f).name
            if not clean.exists():
                write_bytes(clean, (sep or b"").join(good))
            out.append(str(clean))
    return out, skipped


def _decode_error(data: bytes):
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e
    return None
