"""Data pipeline: sources, tokenizers, errors, the stdlib corpus, configs (packing and caches: test_token_cache.py)."""

import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lethe.data.cache
import lethe.data.datamodule
import lethe.data.tokenizer
from helpers import (
    BYTE_EOS,
    BYTE_TOKENIZER,
    assert_one_line,
    column,
    data_config,
    local_dm,
    make_dm,
    options,
    sample_documents,
    write_corpus,
    write_texts,
)
from lethe.data import (
    LMDataModule,
    byte_tokenizer,
    load_tokenizer,
    open_corpus,
    tokenizer_fingerprint,
    train_bpe,
)
from lethe.data.corpus import STDLIB_EXCLUDED_DIRS
from lethe.data.tokenizer import document_encoder
from lethe.errors import ConfigError, DataError

STDLIB, HUB, LOCAL = "lethe.data.corpus.stdlib_corpus", "lethe.data.sources.hub_corpus", "lethe.data.sources.local_corpus"
BPE, PRETRAINED = "lethe.data.tokenizer.trained_bpe", "lethe.data.tokenizer.pretrained"
SMALL_STDLIB = {"_target_": STDLIB, "max_bytes": 300_000}

pytestmark = pytest.mark.usefixtures("hf_cache_in_tmp")


# ---- tokenizers -----------------------------------------------------------------------------
def test_byte_tokenizer_round_trips_any_utf8(tmp_path):
    tok = byte_tokenizer()
    assert len(tok) == 257 and tok.eos_token_id == BYTE_EOS
    rng = random.Random(0)
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    samples = ["", "\x00\r\n\t \x7f", "<|endoftext|> stays text", "😀 naïve Ωmega 中文", "".join(rng.choices(chars, k=2000))]
    encoder = document_encoder(tok)
    for s in samples:
        ids = encoder.encode(s, add_special_tokens=False).ids
        assert ids == list(s.encode("utf-8"))  # id = byte value
        assert tok.decode(ids) == s
    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    for reloaded in (load_tokenizer(tmp_path / "tok"), AutoTokenizer.from_pretrained(tmp_path / "tok")):
        assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tok)
        assert reloaded.decode(list(samples[3].encode())) == samples[3]
        assert reloaded.eos_token_id == BYTE_EOS


def test_bpe_trains_deterministically_and_reloads_from_directory(tmp_path):
    texts = sample_documents(200)
    tok = train_bpe(iter(texts), vocab_size=300)
    assert len(tok) == 300 and tok.eos_token == "<|endoftext|>"
    assert tokenizer_fingerprint(train_bpe(iter(texts), vocab_size=300)) == tokenizer_fingerprint(tok)
    tok.save_pretrained(tmp_path / "bpe")
    reloaded = load_tokenizer(tmp_path / "bpe")
    for t in texts[:20]:
        assert reloaded.encode(t) == tok.encode(t)
        assert reloaded.decode(reloaded.encode(t)) == t
    with pytest.raises(ConfigError) as e:
        load_tokenizer(tmp_path / "nowhere")
    assert_one_line(e, "tokenizer.json")


def test_bpe_is_trained_once_per_corpus_and_cached(tmp_path, monkeypatch):
    dm = local_dm(tmp_path, tokenizer={"_target_": BPE, "vocab_size": 300})
    assert dm.vocab_size == 300
    monkeypatch.setattr(lethe.data.tokenizer, "train_bpe", lambda *a, **k: pytest.fail("BPE retrained"))
    dm2 = local_dm(tmp_path, tokenizer={"_target_": BPE, "vocab_size": 300})
    assert tokenizer_fingerprint(dm2.tokenizer) == tokenizer_fingerprint(dm.tokenizer)
    text = column(dm.corpus.load()["val"], "text")[0]
    ids = np.asarray(dm2.caches["val"].array()[: len(dm.tokenizer.encode(text))], dtype=np.int64)
    assert ids.tolist() == dm.tokenizer.encode(text)  # the stream starts with the first val document


# ---- sources -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["txt", "json", "jsonl", "parquet"])
def test_local_files_and_globs_load(tmp_path, fmt):
    texts = sample_documents(40)
    write_texts(tmp_path / "corpus" / f"a.{fmt}", texts[:25], fmt)
    write_texts(tmp_path / "corpus" / "sub" / f"b.{fmt}", texts[25:], fmt)
    source = {"_target_": LOCAL, "path": str(tmp_path / "corpus" / "**" / f"*.{fmt}"), "holdout": {"val": 5, "test": 5}}
    dm = make_dm(tmp_path, source)
    dm.setup()
    loaded = {s: column(ds, "text") for s, ds in dm.corpus.load().items()}
    assert sorted(sum(loaded.values(), [])) == sorted(texts)
    assert len(loaded["val"]) == len(loaded["test"]) == 5
    for split, split_texts in loaded.items():
        assert dm.token_counts[split] == sum(len(t.encode()) for t in split_texts) + len(split_texts) - 1


def test_local_path_may_name_splits_explicitly(tmp_path):
    texts = sample_documents(50)
    write_texts(tmp_path / "train.jsonl", texts[:40], "jsonl")
    write_texts(tmp_path / "valid.parquet", texts[40:], "parquet")
    paths = {"train": str(tmp_path / "train.jsonl"), "val": str(tmp_path / "valid.parquet")}
    source = {"_target_": LOCAL, "path": paths, "holdout": {"test": 4}}
    dm = make_dm(tmp_path, source)
    dm.setup()
    splits = dm.corpus.load()
    assert column(splits["val"], "text") == texts[40:]
    assert len(splits["test"]) == 4 and len(splits["train"]) == 36


def _hub_style_dir(root: Path, n_train=30, n_val=6) -> Path:
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.table({"story": sample_documents(n_train, seed=1)}), root / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"story": sample_documents(n_val, seed=2)}), root / "data" / "validation-00000-of-00001.parquet")
    return root


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_loader_on_a_local_dataset_repo(tmp_path, streaming):
    repo = _hub_style_dir(tmp_path / "repo")
    source = {"_target_": HUB, "id": str(repo), "splits": {"train": "train", "val": "validation", "test": None},
              "text_column": "story", "streaming": streaming, "max_documents": 20, "holdout": {"test": 3}}
    dm = make_dm(tmp_path, source)
    dm.setup()
    splits = dm.corpus.load()
    assert column(splits["val"], "text") == sample_documents(6, seed=2)
    assert sorted(column(splits["train"], "text") + column(splits["test"], "text")) == sorted(sample_documents(30, seed=1)[:20])
    assert len(splits["test"]) == 3
    if streaming:  # the bounded stream was snapshotted once; a new run reads the snapshot
        assert list((tmp_path / "cache" / "raw" / dm.corpus.fingerprint).glob("*.arrow"))


def test_wikitext_rows_are_grouped_into_articles(tmp_path):
    rows = ["", " = Alpha = \n", "", " Alpha text . \n", " = = Section = = \n", " more . \n", "", " = Beta = \n", " Beta text . \n"]
    pq.write_table(pa.table({"text": rows}), tmp_path / "wiki.parquet")
    source = {"_target_": LOCAL, "path": str(tmp_path / "wiki.parquet"), "documents": "wikitext_articles", "holdout": {"val": 0, "test": 0}}
    corpus = open_corpus(source, tmp_path / "cache")
    articles = column(corpus.load()["train"], "text")
    assert articles == ["\n", " = Alpha = \n\n Alpha text . \n = = Section = = \n more . \n\n", " = Beta = \n Beta text . \n"]


# ---- errors: one line, naming the problem and the fix ------------------------------------
def test_missing_path_error(tmp_path):
    with pytest.raises(DataError) as e:
        make_dm(tmp_path, {"_target_": LOCAL, "path": str(tmp_path / "nope" / "*.txt")}).setup()
    assert_one_line(e, str(tmp_path / "nope"), "glob")


@pytest.mark.parametrize("content", ["", "\n\n   \n\n"])
@pytest.mark.parametrize("suffix", ["txt", "jsonl"])
def test_empty_file_error(tmp_path, content, suffix):
    (tmp_path / f"empty.{suffix}").write_text(content)
    with pytest.raises(DataError) as e:  # not the datasets library's "Please pass `features`"
        make_dm(tmp_path, {"_target_": LOCAL, "path": str(tmp_path / f"empty.{suffix}")}).setup()
    assert_one_line(e, f"empty.{suffix} is empty (no text)", "data.source.path")


def test_a_file_of_random_bytes_is_said_to_be_no_text(tmp_path):
    (tmp_path / "noise.txt").write_bytes(bytes(random.Random(0).randrange(128, 256) for _ in range(20000)))
    with pytest.raises(DataError) as e:
        make_dm(tmp_path, {"_target_": LOCAL, "path": str(tmp_path / "noise.txt")}).setup()
    assert_one_line(e, "noise.txt", "nothing in it is UTF-8 text", "1 paragraph(s) not valid UTF-8", "data.undecodable")


def test_split_too_small_error(tmp_path):
    val_tokens = local_dm(tmp_path).token_counts["val"]
    with pytest.raises(DataError) as e:  # enough for train, too little for val
        local_dm(tmp_path, seq_len=val_tokens)
    assert_one_line(e, "split 'val'", f"{val_tokens} tokens", f"seq_len+1 = {val_tokens + 1}", "lower seq_len or add data", "holdout.val")


def test_unknown_source_key_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        make_dm(tmp_path, {"_target_": LOCAL, "path": "x", "colum": "text"}).setup()
    assert_one_line(e, "data.source.colum is not a setting of local_corpus", "text_column")


@pytest.mark.parametrize("sample_by", ["line", "document"])
def test_undecodable_skip_and_error(tmp_path, caplog, sample_by):
    (tmp_path / "c").mkdir()
    for i in range(10):
        (tmp_path / "c" / f"good{i}.txt").write_text("\n".join(sample_documents(3, seed=i)), encoding="utf-8")
    (tmp_path / "c" / "bad.txt").write_bytes(b"fine line\nbroken \xff\xfe line\nalso fine\n")
    source = {"_target_": LOCAL, "path": str(tmp_path / "c" / "*.txt"), "sample_by": sample_by, "holdout": {"val": 2, "test": 2}}
    with caplog.at_level(logging.WARNING, logger="lethe.data"):
        dm = make_dm(tmp_path, source, undecodable="skip")
        dm.setup()
    texts = sum((column(ds, "text") for ds in dm.corpus.load().values()), [])
    assert not any("broken" in t for t in texts)
    assert any("fine line" in t for t in texts) == (sample_by == "line")  # a bad document goes whole
    assert "skipped 1 undecodable" in caplog.text
    with pytest.raises(DataError) as e:
        make_dm(tmp_path / "strict", source, undecodable="error").setup()
    assert_one_line(e, "bad.txt", "line 2", "undecodable=skip")


OFFLINE_SCRIPT = """
import sys
from lethe.data import LMDataModule
from lethe.errors import LetheError
for source, tokenizer in [({"_target_": "lethe.data.sources.hub_corpus", "id": "roneneldan/TinyStories"},
                           {"_target_": "lethe.data.tokenizer.byte_level"}),
                          ({"_target_": "lethe.data.corpus.stdlib_corpus", "max_bytes": 1000},
                           {"_target_": "lethe.data.tokenizer.pretrained", "name": "EleutherAI/gpt-neox-20b"})]:
    try:
        LMDataModule(source=source, tokenizer=tokenizer, seq_len=8, cache_dir=sys.argv[1]).setup()
    except LetheError as e:
        print(type(e).__name__ + ": " + str(e))
"""


@pytest.mark.slow
def test_unreachable_hub_gives_a_one_line_error(tmp_path):
    # datasets and huggingface_hub read the offline switches at import time: use a fresh process.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path / "cache")], env=env,
                         capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 2, out.stdout + out.stderr
    data, tokenizer = lines
    assert data.startswith("DataError: cannot load hub dataset 'roneneldan/TinyStories'")
    assert "network" in data and "data=local data.source.path=" in data and "HF_HOME" in data
    assert tokenizer.startswith("ConfigError: cannot load tokenizer 'EleutherAI/gpt-neox-20b'")
    assert "network" in tokenizer and "tokenizer.name=/path/to/dir" in tokenizer


def test_pretrained_tokenizer_from_a_local_directory(tmp_path):
    bpe = train_bpe(iter(sample_documents(100)), vocab_size=280)
    bpe.save_pretrained(tmp_path / "tok")
    dm = local_dm(tmp_path, tokenizer={"_target_": PRETRAINED, "name": str(tmp_path / "tok")})
    assert dm.vocab_size == 280 and tokenizer_fingerprint(dm.tokenizer) == tokenizer_fingerprint(bpe)
    text = column(dm.corpus.load()["val"])[0]
    assert np.asarray(dm.caches["val"].array()[: len(bpe.encode(text))]).tolist() == bpe.encode(text)


# ---- the embedded stdlib corpus ------------------------------------------------------------
def test_stdlib_corpus_is_stable_and_split_by_file(tmp_path):
    a, b = open_corpus(SMALL_STDLIB, tmp_path), open_corpus(SMALL_STDLIB, tmp_path)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint.startswith("stdlib-cpython" if sys.implementation.name == "cpython" else "stdlib-")
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in a.fingerprint
    sa, sb = a.load(), b.load()
    paths = {s: column(sa[s], "path") for s in sa}
    assert paths == {s: column(sb[s], "path") for s in sb}
    assert all(paths.values())
    train, val, test = (set(paths[s]) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    for p in sum(paths.values(), []):
        assert p.endswith(".py") and not STDLIB_EXCLUDED_DIRS & set(p.split("/")[:-1])
    other = open_corpus({**SMALL_STDLIB, "max_bytes": 200_000}, tmp_path)
    assert other.fingerprint != a.fingerprint
    full = open_corpus({"_target_": STDLIB}, tmp_path)  # a file's split does not depend on the cap
    full_split = {p: s for s, ps in full.load().items() for p in column(ps, "path")}
    assert all(full_split[p] == s for s, ps in paths.items() for p in ps)


def test_stdlib_datamodule_builds_and_exposes_its_fingerprint(tmp_path):
    dm = make_dm(tmp_path, SMALL_STDLIB, seq_len=64)
    dm.prepare_data()
    dm.setup()
    assert dm.fingerprint == open_corpus(SMALL_STDLIB, tmp_path).fingerprint
    assert dm.vocab_size == 257 and set(dm.token_counts) == {"train", "val", "test"}
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])


# ---- configs ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", options("data"))
def test_data_configs_instantiate(tmp_path, name):
    cfg = data_config(name)
    cfg.seed = 0
    if name == "local":
        write_texts(tmp_path / "mine.jsonl", sample_documents(500), "jsonl")
        cfg.source.path = str(tmp_path / "mine.jsonl")
    if name == "stdlib":
        cfg.source.max_bytes = 300_000
    dm = hydra.utils.instantiate(cfg, tokenizer=BYTE_TOKENIZER, seq_len=32, cache_dir=str(tmp_path / "cache"), _recursive_=False)
    assert isinstance(dm, LMDataModule) and isinstance(dm.source_spec, dict)
    if not dm.source_spec.get("_target_", "").endswith("hub_corpus"):  # hub corpora need the network (synthetic tasks have no source)
        dm.setup()
        assert dm.num_blocks("val") > 0


def test_specs_of_older_checkpoints_still_build(tmp_path):
    """Checkpoints written before sources and tokenizers became `_target_`s carry `kind:` specs;
    eval.py rebuilds their data from them, to the same corpus and the same tokens."""
    source = {"path": str(write_corpus(tmp_path / "corpus") / "*.jsonl"), "holdout": {"val": 0.15, "test": 0.15}}
    old = make_dm(tmp_path / "old", {"kind": "local", **source}, tokenizer={"kind": "byte"})
    new = make_dm(tmp_path / "new", {"_target_": LOCAL, **source})
    old.setup(), new.setup()
    assert old.fingerprint == new.fingerprint and old.token_counts == new.token_counts
    np.testing.assert_array_equal(old.caches["test"].array(), new.caches["test"].array())
    with pytest.raises(ConfigError) as e:
        make_dm(tmp_path, {"kind": "ftp", **source}).setup()
    assert_one_line(e, "data.source.kind='ftp'", "stdlib, hub, local")
