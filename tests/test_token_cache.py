"""Packing and token caches: the stream of separated documents, where documents start, blocks,
max_tokens caps, multiprocess tokenizing, and caches that are reused, rebuilt or keyed apart."""

import numpy as np
import pytest
import torch

import lethe.data.cache
import lethe.data.datamodule
from helpers import BYTE_EOS, column, expected_stream, local_dm, make_dm, sample_documents, write_texts
from lethe.errors import ConfigError

BPE, LOCAL = "lethe.data.tokenizer.trained_bpe", "lethe.data.sources.local_corpus"

pytestmark = pytest.mark.usefixtures("hf_cache_in_tmp")


# ---- splits and packing --------------------------------------------------------------------
def test_splits_are_deterministic_and_disjoint(tmp_path):
    a = local_dm(tmp_path / "a").corpus.load()
    b = local_dm(tmp_path / "b").corpus.load()
    for split in ("train", "val", "test"):
        assert column(a[split], "text") == column(b[split], "text")
        assert len(a[split]) > 0
    sets = [set(column(a[s], "text")) for s in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(sample_documents(60))


def test_packing_blocks_are_the_separated_stream(tmp_path):
    dm = local_dm(tmp_path, seq_len=16)
    for split in ("train", "val", "test"):
        stream = expected_stream(column(dm.corpus.load()[split], "text"))
        np.testing.assert_array_equal(np.asarray(dm.caches[split].array(), dtype=np.int64), stream)
        assert dm.caches[split].array().dtype == np.uint16
        n = dm.num_blocks(split)
        assert n == (len(stream) - 1) // 16
    val = list(dm.val_dataloader())
    inputs = torch.cat([b["input_ids"] for b in val])
    labels = torch.cat([b["labels"] for b in val])
    assert inputs.dtype == labels.dtype == torch.long and inputs.shape == (dm.num_blocks("val"), 16)
    stream = torch.from_numpy(expected_stream(column(dm.corpus.load()["val"], "text")))
    for i in range(len(inputs)):
        assert torch.equal(inputs[i], stream[i * 16 : (i + 1) * 16])
        assert torch.equal(labels[i], stream[i * 16 + 1 : (i + 1) * 16 + 1])


def stream_starts(stream: np.ndarray) -> np.ndarray:
    """Where documents start, found independently of the cache's record: at 0 and at every <eos>
    (the byte tokenizer's eos never comes out of text)."""
    return np.concatenate([[0], np.flatnonzero(stream == BYTE_EOS)])


@pytest.mark.parametrize("pack_batch", [8192, 7])  # 7: documents packed across several writes
def test_document_starts_are_recorded_beside_the_stream(tmp_path, monkeypatch, pack_batch):
    monkeypatch.setattr(lethe.data.cache, "PACK_BATCH", pack_batch)
    dm = local_dm(tmp_path, seq_len=16)
    for split in ("train", "val", "test"):
        cache = dm.caches[split]
        stream = np.asarray(cache.array(), dtype=np.int64)
        np.testing.assert_array_equal(cache.document_starts(), stream_starts(stream))
        assert cache.num_documents == len(column(dm.corpus.load()[split]))
    # every block flags the inputs where a document starts; labels and inputs are as before
    stream = np.asarray(dm.caches["val"].array(), dtype=np.int64)
    for i, batch in enumerate(dm.val_dataloader()):
        assert batch["document_starts"].dtype == torch.bool and batch["document_starts"].shape == batch["input_ids"].shape
        for row, (inputs, starts) in enumerate(zip(batch["input_ids"], batch["document_starts"])):
            begin = (i * dm.eval_batch_size + row) * 16
            expected = (inputs == BYTE_EOS) | (begin == 0) & (torch.arange(16) == 0)
            assert torch.equal(starts, expected)
    crossing = local_dm(tmp_path, seq_len=16, cross_document=True)
    assert set(next(iter(crossing.val_dataloader()))) == {"input_ids", "labels"}


def test_cross_document_must_be_a_bool(tmp_path):
    with pytest.raises(ConfigError, match="data.cross_document"):
        local_dm(tmp_path, cross_document="no")


def test_a_capped_stream_keeps_the_starts_inside_it(tmp_path):
    full = local_dm(tmp_path)
    capped = local_dm(tmp_path, max_tokens={"train": 100})
    starts = full.caches["train"].document_starts()
    np.testing.assert_array_equal(capped.caches["train"].document_starts(), starts[starts < 100])


def test_a_cache_without_its_starts_is_rebuilt(tmp_path):
    dm = local_dm(tmp_path)
    dm.caches["train"].starts_path.unlink()
    again = local_dm(tmp_path)
    np.testing.assert_array_equal(again.caches["train"].document_starts(), dm.caches["train"].document_starts())


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
    leftovers = [p for p in (tmp_path / "cache").rglob(".*") if p.name.endswith(".tmp") or ".work-" in p.name]
    assert not leftovers  # no temp files (lethe.files) or tokenizing work directories left behind


def test_cache_without_sidecar_is_rebuilt(tmp_path):
    dm = local_dm(tmp_path)
    dm.caches["train"].path.with_suffix(".json").unlink()  # as if the run died between .bin and sidecar
    again = local_dm(tmp_path)
    np.testing.assert_array_equal(again.caches["train"].array(), dm.caches["train"].array())


def test_cache_key_changes_with_tokenizer_and_source(tmp_path):
    byte = local_dm(tmp_path)
    bpe = local_dm(tmp_path, tokenizer={"_target_": BPE, "vocab_size": 300})
    assert byte.caches["train"].path != bpe.caches["train"].path
    assert byte.fingerprint == bpe.fingerprint  # same corpus
    write_texts(tmp_path / "corpus" / "more.jsonl", ["one more document"], "jsonl")
    dm = make_dm(tmp_path, {"_target_": LOCAL, "path": str(tmp_path / "corpus" / "*.jsonl"), "holdout": {"val": 0.15, "test": 0.15}})
    dm.setup()
    assert dm.fingerprint != byte.fingerprint
    assert dm.caches["train"].path != byte.caches["train"].path
