"""Data pipeline: sources, splits, tokenizers, packing, caches, resumable sampling, errors."""

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import datasets
import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

import lethe.data.cache
import lethe.data.datamodule
import lethe.data.tokenizer
from lethe.data import (
    BlockStream, EvalShard, LMDataModule, block_permutation, byte_tokenizer, load_tokenizer, open_corpus,
    tokenizer_fingerprint, train_bpe,
)
from lethe.data.corpus import STDLIB_EXCLUDED_DIRS
from lethe.data.tokenizer import document_encoder
from lethe.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
SMALL_STDLIB = {"kind": "stdlib", "max_bytes": 300_000}
EOS = 256  # the byte tokenizer's <|endoftext|>


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def docs(n=60, seed=0):
    """Deterministic documents with non-ASCII text and no blank lines inside."""
    rng = random.Random(seed)
    words = ["mamba", "state", "space", "scan", "résumé", "naïve", "Ωmega", "😀", "token", "x=1;"]
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 25))) for i in range(n)]


def write(path: Path, texts, fmt: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "txt":
        path.write_text("\n\n".join(texts), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps([{"text": t} for t in texts]), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.table({"text": texts}), path)
    return path


def make_dm(tmp_path, source, tokenizer=None, seq_len=16, **kw) -> LMDataModule:
    kw = {"batch_size": 4, "num_proc": 1, "cache_dir": tmp_path / "cache", **kw}
    return LMDataModule(source=source, tokenizer=tokenizer or {"kind": "byte"}, seq_len=seq_len, **kw)


def local_dm(tmp_path, n=60, **kw):
    write(tmp_path / "corpus" / "docs.jsonl", docs(n), "jsonl")
    source = {"kind": "local", "path": str(tmp_path / "corpus" / "*.jsonl"), "holdout": {"val": 0.15, "test": 0.15}}
    dm = make_dm(tmp_path, source, **kw)
    dm.setup()
    return dm


def col(ds, name="text") -> list:
    return list(ds[name])


def expected_stream(texts) -> np.ndarray:
    out = []
    for i, t in enumerate(texts):
        out += ([EOS] if i else []) + list(t.encode("utf-8"))
    return np.array(out, dtype=np.int64)


def one_line_error(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ---- tokenizers -----------------------------------------------------------------------------
def test_byte_tokenizer_round_trips_any_utf8(tmp_path):
    tok = byte_tokenizer()
    assert len(tok) == 257 and tok.eos_token_id == EOS
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
        assert reloaded.eos_token_id == EOS


def test_bpe_trains_deterministically_and_reloads_from_directory(tmp_path):
    texts = docs(200)
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
    one_line_error(e, "tokenizer.json")


def test_bpe_is_trained_once_per_corpus_and_cached(tmp_path, monkeypatch):
    dm = local_dm(tmp_path, tokenizer={"kind": "bpe", "vocab_size": 300})
    assert dm.vocab_size == 300
    monkeypatch.setattr(lethe.data.tokenizer, "train_bpe", lambda *a, **k: pytest.fail("BPE retrained"))
    dm2 = local_dm(tmp_path, tokenizer={"kind": "bpe", "vocab_size": 300})
    assert tokenizer_fingerprint(dm2.tokenizer) == tokenizer_fingerprint(dm.tokenizer)
    text = col(dm.corpus.load()["val"], "text")[0]
    ids = np.asarray(dm2.caches["val"].array()[: len(dm.tokenizer.encode(text))], dtype=np.int64)
    assert ids.tolist() == dm.tokenizer.encode(text)  # the stream starts with the first val document


# ---- sources -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["txt", "json", "jsonl", "parquet"])
def test_local_files_and_globs_load(tmp_path, fmt):
    texts = docs(40)
    write(tmp_path / "corpus" / f"a.{fmt}", texts[:25], fmt)
    write(tmp_path / "corpus" / "sub" / f"b.{fmt}", texts[25:], fmt)
    source = {"kind": "local", "path": str(tmp_path / "corpus" / "**" / f"*.{fmt}"), "holdout": {"val": 5, "test": 5}}
    dm = make_dm(tmp_path, source)
    dm.setup()
    loaded = {s: col(ds, "text") for s, ds in dm.corpus.load().items()}
    assert sorted(sum(loaded.values(), [])) == sorted(texts)
    assert len(loaded["val"]) == len(loaded["test"]) == 5
    for split, split_texts in loaded.items():
        assert dm.token_counts[split] == sum(len(t.encode()) for t in split_texts) + len(split_texts) - 1


def test_local_path_may_name_splits_explicitly(tmp_path):
    texts = docs(50)
    write(tmp_path / "train.jsonl", texts[:40], "jsonl")
    write(tmp_path / "valid.parquet", texts[40:], "parquet")
    source = {"kind": "local", "path": {"train": str(tmp_path / "train.jsonl"), "val": str(tmp_path / "valid.parquet")}, "holdout": {"test": 4}}
    dm = make_dm(tmp_path, source)
    dm.setup()
    splits = dm.corpus.load()
    assert col(splits["val"], "text") == texts[40:]
    assert len(splits["test"]) == 4 and len(splits["train"]) == 36


def _hub_style_dir(root: Path, n_train=30, n_val=6) -> Path:
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.table({"story": docs(n_train, seed=1)}), root / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"story": docs(n_val, seed=2)}), root / "data" / "validation-00000-of-00001.parquet")
    return root


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_loader_on_a_local_dataset_repo(tmp_path, streaming):
    repo = _hub_style_dir(tmp_path / "repo")
    source = {"kind": "hub", "id": str(repo), "splits": {"train": "train", "val": "validation", "test": None},
              "text_column": "story", "streaming": streaming, "max_documents": 20, "holdout": {"test": 3}}
    dm = make_dm(tmp_path, source)
    dm.setup()
    splits = dm.corpus.load()
    assert col(splits["val"], "text") == docs(6, seed=2)
    assert sorted(col(splits["train"], "text") + col(splits["test"], "text")) == sorted(docs(30, seed=1)[:20])
    assert len(splits["test"]) == 3
    if streaming:  # the bounded stream was snapshotted once; a new run reads the snapshot
        assert list((tmp_path / "cache" / "raw" / dm.corpus.fingerprint).glob("*.arrow"))


def test_wikitext_rows_are_grouped_into_articles(tmp_path):
    rows = ["", " = Alpha = \n", "", " Alpha text . \n", " = = Section = = \n", " more . \n", "", " = Beta = \n", " Beta text . \n"]
    pq.write_table(pa.table({"text": rows}), tmp_path / "wiki.parquet")
    source = {"kind": "local", "path": str(tmp_path / "wiki.parquet"), "documents": "wikitext_articles", "holdout": {"val": 0, "test": 0}}
    corpus = open_corpus(source, tmp_path / "cache")
    articles = col(corpus.load()["train"], "text")
    assert articles == ["\n", " = Alpha = \n\n Alpha text . \n = = Section = = \n more . \n\n", " = Beta = \n Beta text . \n"]


# ---- splits and packing --------------------------------------------------------------------
def test_splits_are_deterministic_and_disjoint(tmp_path):
    a = local_dm(tmp_path / "a").corpus.load()
    b = local_dm(tmp_path / "b").corpus.load()
    for split in ("train", "val", "test"):
        assert col(a[split], "text") == col(b[split], "text")
        assert len(a[split]) > 0
    sets = [set(col(a[s], "text")) for s in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(docs(60))


def test_packing_blocks_are_the_separated_stream(tmp_path):
    dm = local_dm(tmp_path, seq_len=16)
    for split in ("train", "val", "test"):
        stream = expected_stream(col(dm.corpus.load()[split], "text"))
        np.testing.assert_array_equal(np.asarray(dm.caches[split].array(), dtype=np.int64), stream)
        assert dm.caches[split].array().dtype == np.uint16
        n = dm.num_blocks(split)
        assert n == (len(stream) - 1) // 16
    val = list(dm.val_dataloader())
    inputs = torch.cat([b["input_ids"] for b in val])
    labels = torch.cat([b["labels"] for b in val])
    assert inputs.dtype == labels.dtype == torch.long and inputs.shape == (dm.num_blocks("val"), 16)
    stream = torch.from_numpy(expected_stream(col(dm.corpus.load()["val"], "text")))
    for i in range(len(inputs)):
        assert torch.equal(inputs[i], stream[i * 16 : (i + 1) * 16])
        assert torch.equal(labels[i], stream[i * 16 + 1 : (i + 1) * 16 + 1])


def test_max_tokens_caps_a_split_and_changes_the_fingerprint(tmp_path):
    full = local_dm(tmp_path)
    capped = local_dm(tmp_path, max_tokens={"train": 100})
    assert capped.token_counts["train"] == 100 and capped.token_counts["val"] == full.token_counts["val"]
    np.testing.assert_array_equal(capped.caches["train"].array(), full.caches["train"].array()[:100])
    assert capped.fingerprint != full.fingerprint


def test_multiprocess_tokenization_matches_in_process(tmp_path, monkeypatch):
    monkeypatch.setattr(lethe.data.cache, "MIN_DOCS_PER_PROCESS", 1)
    one = local_dm(tmp_path / "one", num_proc=1)
    two = local_dm(tmp_path / "two", num_proc=2)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(one.caches[split].array(), two.caches[split].array())


# ---- caches --------------------------------------------------------------------------------
def test_cache_is_reused_without_tokenizing_again(tmp_path, monkeypatch):
    first = local_dm(tmp_path)
    mtimes = {s: c.path.stat().st_mtime_ns for s, c in first.caches.items()}
    monkeypatch.setattr(lethe.data.datamodule, "build_cache", lambda *a, **k: pytest.fail("tokenized again"))
    second = local_dm(tmp_path)
    for split in ("train", "val", "test"):
        assert second.caches[split].path == first.caches[split].path
        assert second.caches[split].path.stat().st_mtime_ns == mtimes[split]
        np.testing.assert_array_equal(second.caches[split].array(), first.caches[split].array())
    assert not list((tmp_path / "cache").rglob("*.tmp-*"))  # no temp files left behind


def test_cache_without_sidecar_is_rebuilt(tmp_path):
    dm = local_dm(tmp_path)
    dm.caches["train"].path.with_suffix(".json").unlink()  # as if the run died between .bin and sidecar
    again = local_dm(tmp_path)
    np.testing.assert_array_equal(again.caches["train"].array(), dm.caches["train"].array())


def test_cache_key_changes_with_tokenizer_and_source(tmp_path):
    byte = local_dm(tmp_path)
    bpe = local_dm(tmp_path, tokenizer={"kind": "bpe", "vocab_size": 300})
    assert byte.caches["train"].path != bpe.caches["train"].path
    assert byte.fingerprint == bpe.fingerprint  # same corpus
    write(tmp_path / "corpus" / "more.jsonl", ["one more document"], "jsonl")
    dm = make_dm(tmp_path, {"kind": "local", "path": str(tmp_path / "corpus" / "*.jsonl"), "holdout": {"val": 0.15, "test": 0.15}})
    dm.setup()
    assert dm.fingerprint != byte.fingerprint
    assert dm.caches["train"].path != byte.caches["train"].path


# ---- errors: one line, naming the problem and the fix ------------------------------------
def test_missing_path_error(tmp_path):
    with pytest.raises(DataError) as e:
        make_dm(tmp_path, {"kind": "local", "path": str(tmp_path / "nope" / "*.txt")}).setup()
    one_line_error(e, str(tmp_path / "nope"), "glob")


def test_empty_corpus_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n\n")
    with pytest.raises(DataError) as e:
        make_dm(tmp_path, {"kind": "local", "path": str(tmp_path / "empty.txt")}).setup()
    one_line_error(e, "empty")


def test_split_too_small_error(tmp_path):
    val_tokens = local_dm(tmp_path).token_counts["val"]
    with pytest.raises(DataError) as e:  # enough for train, too little for val
        local_dm(tmp_path, seq_len=val_tokens)
    one_line_error(e, "split 'val'", f"{val_tokens} tokens", f"seq_len+1 = {val_tokens + 1}", "lower seq_len or add data", "holdout.val")


def test_unknown_source_key_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        make_dm(tmp_path, {"kind": "local", "path": "x", "colum": "text"}).setup()
    one_line_error(e, "colum")


@pytest.mark.parametrize("sample_by", ["line", "document"])
def test_undecodable_skip_and_error(tmp_path, caplog, sample_by):
    (tmp_path / "c").mkdir()
    for i in range(10):
        (tmp_path / "c" / f"good{i}.txt").write_text("\n".join(docs(3, seed=i)), encoding="utf-8")
    (tmp_path / "c" / "bad.txt").write_bytes(b"fine line\nbroken \xff\xfe line\nalso fine\n")
    source = {"kind": "local", "path": str(tmp_path / "c" / "*.txt"), "sample_by": sample_by, "holdout": {"val": 2, "test": 2}}
    with caplog.at_level(logging.WARNING, logger="lethe.data"):
        dm = make_dm(tmp_path, source, undecodable="skip")
        dm.setup()
    texts = sum((col(ds, "text") for ds in dm.corpus.load().values()), [])
    assert not any("broken" in t for t in texts)
    assert any("fine line" in t for t in texts) == (sample_by == "line")  # a bad document goes whole
    assert "skipped 1 undecodable" in caplog.text
    with pytest.raises(DataError) as e:
        make_dm(tmp_path / "strict", source, undecodable="error").setup()
    one_line_error(e, "bad.txt", "line 2", "undecodable=skip")


OFFLINE_SCRIPT = """
import sys
from lethe.data import LMDataModule
from lethe.errors import LetheError
for source, tokenizer in [({"kind": "hub", "id": "roneneldan/TinyStories"}, {"kind": "byte"}),
                          ({"kind": "stdlib", "max_bytes": 1000}, {"kind": "pretrained", "name": "EleutherAI/gpt-neox-20b"})]:
    try:
        LMDataModule(source=source, tokenizer=tokenizer, seq_len=8, cache_dir=sys.argv[1]).setup()
    except LetheError as e:
        print(type(e).__name__ + ": " + str(e))
"""


def test_unreachable_hub_gives_a_one_line_error(tmp_path):
    # datasets and huggingface_hub read the offline switches at import time: use a fresh process.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path / "cache")], env=env,
                         capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 2, out.stdout + out.stderr
    data, tokenizer = lines
    assert data.startswith("DataError: cannot load hub dataset 'roneneldan/TinyStories'")
    assert "network" in data and "data.source.kind=local data.source.path=" in data and "HF_HOME" in data
    assert tokenizer.startswith("ConfigError: cannot load tokenizer 'EleutherAI/gpt-neox-20b'")
    assert "network" in tokenizer and "tokenizer.name=/path/to/dir" in tokenizer


def test_pretrained_tokenizer_from_a_local_directory(tmp_path):
    bpe = train_bpe(iter(docs(100)), vocab_size=280)
    bpe.save_pretrained(tmp_path / "tok")
    dm = local_dm(tmp_path, tokenizer={"kind": "pretrained", "name": str(tmp_path / "tok")})
    assert dm.vocab_size == 280 and tokenizer_fingerprint(dm.tokenizer) == tokenizer_fingerprint(bpe)
    text = col(dm.corpus.load()["val"])[0]
    assert np.asarray(dm.caches["val"].array()[: len(bpe.encode(text))]).tolist() == bpe.encode(text)


# ---- sampling --------------------------------------------------------------------------
def test_block_permutations_are_seeded_per_epoch():
    p = block_permutation(1000, seed=3, epoch=0)
    assert sorted(p.tolist()) == list(range(1000))
    assert np.array_equal(p, block_permutation(1000, seed=3, epoch=0))
    assert not np.array_equal(p, block_permutation(1000, seed=3, epoch=1))
    assert not np.array_equal(p, block_permutation(1000, seed=4, epoch=0))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_stream_resumes_exactly_from_state(tmp_path):
    dm = local_dm(tmp_path, seq_len=8)
    n = dm.num_blocks("train")
    it = iter(dm.train_dataloader())
    take(it, 5)
    state = dm.state_dict()
    assert state == {"samples_seen": 5 * 4}
    expected = take(it, (2 * n) // 4)  # runs across epoch boundaries
    fresh = local_dm(tmp_path, seq_len=8)
    fresh.load_state_dict(state)
    resumed = take(iter(fresh.train_dataloader()), len(expected))
    for a, b in zip(expected, resumed):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    # every epoch visits every block once
    stream = BlockStream(n, seed=0)
    assert sorted(stream.global_index(p) for p in range(n, 2 * n)) == list(range(n))


@pytest.mark.parametrize("start", [0, 6])
def test_ddp_shards_interleave_to_the_single_process_stream(start):
    single = iter(BlockStream(37, seed=1, start=lambda: start, rank=0, world_size=1))
    ranks = [iter(BlockStream(37, seed=1, start=lambda: start, rank=r, world_size=2)) for r in range(2)]
    interleaved = [i for pair in zip(take(ranks[0], 50), take(ranks[1], 50)) for i in pair]
    assert interleaved == take(single, 100)


def test_eval_shards_cover_every_block_once_in_order():
    for world in (1, 2, 3, 4):
        shards = [list(EvalShard(10, rank=r, world_size=world)) for r in range(world)]
        assert sum(shards, []) == list(range(10))
        assert [len(EvalShard(10, rank=r, world_size=world)) for r in range(world)] == [len(s) for s in shards]


def test_samples_seen_counts_batches_lightning_consumed(tmp_path):
    """Lightning fetches a batch ahead; the resume position must count only consumed batches."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["input_ids"].clone())
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(steps, dm):
        module = Recorder()
        L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  use_distributed_sampler=False).fit(module, datamodule=dm)
        return module.seen

    full = fit(5, local_dm(tmp_path, seq_len=8))
    first = local_dm(tmp_path, seq_len=8)
    fit(2, first)
    assert first.state_dict() == {"samples_seen": 2 * 4}
    resumed = local_dm(tmp_path, seq_len=8)
    resumed.load_state_dict(first.state_dict())
    rest = fit(3, resumed)
    for a, b in zip(full[2:], rest):
        assert torch.equal(a, b)


# ---- the embedded stdlib corpus ------------------------------------------------------------
def test_stdlib_corpus_is_stable_and_split_by_file(tmp_path):
    a, b = open_corpus(SMALL_STDLIB, tmp_path), open_corpus(SMALL_STDLIB, tmp_path)
    assert a.fingerprint == b.fingerprint and a.fingerprint.startswith("stdlib-cpython" if sys.implementation.name == "cpython" else "stdlib-")
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in a.fingerprint
    sa, sb = a.load(), b.load()
    paths = {s: col(sa[s], "path") for s in sa}
    assert paths == {s: col(sb[s], "path") for s in sb}
    assert all(paths.values())
    assert not (set(paths["train"]) & set(paths["val"]) or set(paths["train"]) & set(paths["test"]) or set(paths["val"]) & set(paths["test"]))
    for p in sum(paths.values(), []):
        assert p.endswith(".py") and not STDLIB_EXCLUDED_DIRS & set(p.split("/")[:-1])
    other = open_corpus({**SMALL_STDLIB, "max_bytes": 200_000}, tmp_path)
    assert other.fingerprint != a.fingerprint
    full = open_corpus({"kind": "stdlib"}, tmp_path)  # a file's split does not depend on the cap
    full_split = {p: s for s, ps in full.load().items() for p in col(ps, "path")}
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
@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml")))
def test_data_configs_instantiate(tmp_path, name):
    cfg = OmegaConf.create({"seed": 0, "seq_len": 32, "data": OmegaConf.load(REPO / "conf" / "data" / f"{name}.yaml")})
    if name == "local":
        write(tmp_path / "mine.jsonl", docs(500), "jsonl")
        cfg.data.source.path = str(tmp_path / "mine.jsonl")
    if name == "stdlib":
        cfg.data.source.max_bytes = 300_000
    for tok in ("byte", "bpe", "gpt-neox"):
        OmegaConf.load(REPO / "conf" / "tokenizer" / f"{tok}.yaml")  # parses
    dm = hydra.utils.instantiate(cfg.data, tokenizer=OmegaConf.load(REPO / "conf" / "tokenizer" / "byte.yaml"),
                                 seq_len=cfg.seq_len, cache_dir=str(tmp_path / "cache"), _recursive_=False)
    assert isinstance(dm, LMDataModule) and isinstance(dm.source_spec, dict)
    if dm.source_spec.get("kind") != "hub":  # hub corpora need the network (synthetic tasks have no source)
        dm.setup()
        assert dm.num_blocks("val") > 0
