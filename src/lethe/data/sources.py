"""Corpora from the Hugging Face Hub and from local files, behind one `open_corpus(spec)`.

Source spec (the `data.source` config node), by kind:
  stdlib: root (null = this interpreter's stdlib), max_bytes, holdout
  hub:    id, config, revision, splits {train, val, test: source split name or null}, streaming,
          max_documents, text_column, documents, holdout
  local:  path (file, directory, glob, list of those, or {train, val, test: ...}), text_column,
          sample_by (txt: line|paragraph|document), max_documents, documents, holdout
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

from lethe.data.corpus import SPLITS, Corpus, carve, check_holdout, digest, stdlib_corpus, write_documents
from lethe.errors import ConfigError, DataError

log = logging.getLogger(__name__)

COMMON_KEYS = {"kind", "holdout"}
KEYS = {
    "stdlib": {"root", "max_bytes"},
    "hub": {"id", "config", "revision", "splits", "streaming", "max_documents", "text_column", "documents"},
    "local": {"path", "text_column", "sample_by", "max_documents", "documents"},
}
DEFAULT_HOLDOUT = {"val": 0.005, "test": 0.005}
DOCUMENT_MODES = ("rows", "wikitext_articles")
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # anything else is plain text


def open_corpus(spec: dict, cache_dir, undecodable: str = "skip") -> Corpus:
    kind = spec.get("kind")
    if kind not in KEYS:
        raise ConfigError(f"data.source.kind={kind!r}; choose one of {', '.join(KEYS)}")
    unknown = set(spec) - COMMON_KEYS - KEYS[kind]
    if unknown:
        raise ConfigError(f"data.source has unknown key(s) {sorted(unknown)} for kind={kind}; allowed: {sorted(COMMON_KEYS | KEYS[kind])}")
    if kind == "stdlib":
        return stdlib_corpus(spec, undecodable)
    if spec.get("documents", "rows") not in DOCUMENT_MODES:
        raise ConfigError(f"data.source.documents={spec['documents']!r}; choose one of {', '.join(DOCUMENT_MODES)}")
    holdout = check_holdout({**DEFAULT_HOLDOUT, **(spec.get("holdout") or {})})
    return (hub_corpus if kind == "hub" else local_corpus)(spec, holdout, Path(cache_dir), undecodable)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


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
def hub_corpus(spec, holdout, cache_dir, undecodable) -> Corpus:
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
            f"cannot load {where}: the Hub is unreachable ({_first_line(e)}); it needs network access or a local copy: "
            "pre-download it with network, set HF_HOME to that cache and HF_DATASETS_OFFLINE=1, or use data.source.kind=local data.source.path=<files>"
        ) from None
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(f"cannot load {where}: {_first_line(e)}; check data.source.id, or use data.source.kind=local data.source.path=<files>") from None
    except (ValueError, FileNotFoundError) as e:  # unknown config or split name, missing files
        raise DataError(f"cannot load split '{split}' of {where}: {_first_line(e)}; check data.source.config and data.source.splits") from None


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


def local_corpus(spec, holdout, cache_dir, undecodable) -> Corpus:
    path = spec.get("path")
    if not path:
        raise ConfigError("data.source.path is empty; give files, a directory or a glob (e.g. data.source.path='corpus/*.txt')")
    by_split = path if isinstance(path, dict) else {"train": path}
    if set(by_split) - set(SPLITS) or "train" not in by_split:
        raise ConfigError(f"data.source.path has keys {sorted(by_split)}; use train (required), val, test")
    files = {split: _resolve(p) for split, p in by_split.items()}
    sample_by = spec.get("sample_by", "paragraph")
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
    parts, skipped = [], 0
    for builder, group in groups.items():
        unit = {"text": sample_by, "json": "line", "parquet": None}[builder]
        if unit:
            group, n = _utf8_files(group, unit, undecodable, cache_dir / "clean")
            skipped += n
        if not group:
            continue
        kwargs = {"sample_by": sample_by} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=group, split="train", cache_dir=str(cache_dir / "hf"), **kwargs)
        except Exception as e:  # malformed JSON/Parquet surfaces as a DatasetGenerationError
            cause = e.__cause__ or e
            raise DataError(f"cannot read local {builder} files ({group[0]}{' ...' if len(group) > 1 else ''}): {_first_line(cause)}; check the file format") from None
        parts.append(_text_only(ds, spec.get("text_column", "text"), f"local {builder} file(s) {group[0]}"))
    if skipped:
        log.warning("skipped %d undecodable (non-UTF-8) line(s)/document(s) in local files (data.undecodable=skip)", skipped)
    if not parts:
        return datasets.Dataset.from_dict({"text": []})
    return datasets.concatenate_datasets(parts)


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
                clean.parent.mkdir(parents=True, exist_ok=True)
                tmp = clean.with_name(f".{clean.name}.tmp-{os.getpid()}")
                tmp.write_bytes((sep or b"").join(good))
                os.replace(tmp, clean)
            out.append(str(clean))
    return out, skipped


def _decode_error(data: bytes):
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e
    return None
