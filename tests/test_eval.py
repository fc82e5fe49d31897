"""eval.py on checkpoints trained here: exact token counts, perplexity and bits per byte against
an independent scoring of the same tokens, the context-length sweep, outputs and errors."""

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import BYTE_TOKENIZER, SMOKE, run_script
from lethe.data import LMDataModule
from lethe.data.datamodule import cross_document_setting
from lethe.errors import LetheError
from lethe.evaluation import find_checkpoints
from lethe.training.checkpoint import load_trained_model

LENGTHS = [32, 64, 128]  # 0.5x, 1x, 2x the training length of experiment=smoke


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A Mamba and its matched Transformer trained alike (what `make compare` does, in seconds)."""
    root = tmp_path_factory.mktemp("compare")
    data_dir, sweep = root / "data", root / "sweep"
    run_script("train.py", "-m", *SMOKE, f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}", "model=mamba-tiny",
               "baseline=none,matched", "trainer.max_steps=10", "trainer.val_check_interval=10", "trainer.limit_test_batches=2")
    out = root / "eval"
    proc = run_script("eval.py", f"ckpt={sweep}", f"paths.data_dir={data_dir}", f"out_dir={out}", "lengths=[0.5,1,2]",
                      "splits=[test]", f"paths.log_dir={root / 'logs'}")  # Hydra's eval.log: not in the repo
    return sweep, data_dir, out, proc


def independent_scores(ckpt, data_dir, length, cross_document=False):
    """Sum of NLL, scored tokens and bytes over every whole block of `length` tokens of the test
    split, read straight from the token cache and scored with a plain cross-entropy. Without
    cross_document (how these runs trained) each document of a block (the byte tokenizer's <eos>,
    found in the stream itself, opens one) is scored alone, from an empty state."""
    model, tokenizer, meta = load_trained_model(ckpt)
    data = meta["run_config"]["data"]
    dm = LMDataModule(source=data["source"], tokenizer=BYTE_TOKENIZER, seq_len=length, cache_dir=data_dir,
                      max_tokens=data["max_tokens"])
    dm.prepare_data()
    stream = torch.from_numpy(dm.caches["test"].array().astype("int64"))
    blocks = (len(stream) - 1) // length
    nll = 0.0
    with torch.no_grad():
        for block in range(blocks):
            inputs, labels = stream[block * length:(block + 1) * length], stream[block * length + 1:(block + 1) * length + 1]
            bounds = sorted({0, length, *([] if cross_document else (inputs == tokenizer.eos_token_id).nonzero()[:, 0].tolist())})
            for begin, end in zip(bounds[:-1], bounds[1:]):
                logits = model(inputs[None, begin:end])[0]
                nll += F.cross_entropy(logits, labels[begin:end], reduction="sum").item()
    labels = stream[1:blocks * length + 1]
    return nll, blocks * length, int((labels != tokenizer.eos_token_id).sum())  # bytes: <eos> is no text


@pytest.mark.slow
def test_eval_scores_match_an_independent_computation(compared):
    sweep, data_dir, out, proc = compared
    rows = json.loads((out / "eval.json").read_text())
    assert sorted(r["model"] for r in rows) == ["MambaLM", "TransformerLM"]
    for row in rows:
        assert [e["length"] for e in row["lengths"]] == LENGTHS and row["tokens_trained"] == 10 * 4 * 64
        for entry in row["lengths"]:
            nll, tokens, num_bytes = independent_scores(row["ckpt"], data_dir, entry["length"])
            assert entry["tokens"] == tokens
            assert entry["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
            assert entry["bpb"] == pytest.approx(nll / (math.log(2) * num_bytes), rel=1e-4)
        assert {"length": 64, **row["test"]} == row["lengths"][1]  # 1x: the split at its training length
    assert f"| {rows[0]['label']} |" in proc.stdout and "ppl@128" in proc.stdout
    assert len({r['label'] for r in rows}) == 2  # both runs are named smoke: their directories tell them apart
    with open(out / "eval.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and float(table[0]["ppl@32"]) == pytest.approx(rows[0]["lengths"][0]["ppl"], rel=1e-3)
    assert (out / "ppl_vs_length.png").stat().st_size > 0 and (out / "val_curves.png").stat().st_size > 0


@pytest.mark.slow
def test_eval_follows_the_checkpoints_document_setting_unless_told(compared, tmp_path):
    sweep, data_dir, out, _ = compared
    rows = json.loads((out / "eval.json").read_text())
    assert all(r["cross_document"] is False for r in rows)  # as trained (the data config's default)
    ckpt = next(r["ckpt"] for r in rows if r["model"] == "MambaLM")
    run_script("eval.py", f"ckpt={ckpt}", f"paths.data_dir={data_dir}", f"out_dir={tmp_path}", "lengths=[]", "splits=[test]",
               "cross_document=true", f"paths.log_dir={tmp_path / 'logs'}")
    crossing = json.loads((tmp_path / "eval.json").read_text())[0]
    nll, tokens, _ = independent_scores(ckpt, data_dir, 64, cross_document=True)
    reset_nll, _, _ = independent_scores(ckpt, data_dir, 64)
    assert crossing["cross_document"] is True and crossing["test"]["tokens"] == tokens
    # ten training steps leave the two settings only ~5e-5 apart: each score must sit on its own
    # independent value, far closer to it than to the other setting's
    reset = next(r for r in rows if r["ckpt"] == ckpt)["test"]["ppl"]
    independent = {"cross": math.exp(nll / tokens), "reset": math.exp(reset_nll / tokens)}
    gap = abs(independent["cross"] - independent["reset"])
    assert gap > 0
    assert abs(crossing["test"]["ppl"] - independent["cross"]) < gap / 5
    assert abs(reset - independent["reset"]) < gap / 5


def test_runs_from_before_the_switch_crossed_documents():
    lm = {"_target_": "lethe.data.LMDataModule", "source": {}}
    assert cross_document_setting(lm) is True  # written before data.cross_document existed
    assert cross_document_setting({**lm, "cross_document": False}) is False
    assert cross_document_setting({"_target_": "lethe.data.synthetic.SyntheticDataModule"}) is None
    assert cross_document_setting(None) is None


@pytest.mark.slow
def test_matched_pair_trains_on_the_same_budget(compared):
    sweep = compared[0]
    runs = [json.loads(p.read_text()) for p in sorted(sweep.rglob("metrics.json"))]
    mamba, transformer = sorted(runs, key=lambda m: m["model"])
    assert transformer["matched"]["reference_params"] == mamba["num_params"]
    assert abs(transformer["num_params"] - mamba["num_params"]) <= 0.02 * mamba["num_params"]
    assert mamba["tokens_seen"] == transformer["tokens_seen"] and mamba["corpus_fingerprint"] == transformer["corpus_fingerprint"]


@pytest.mark.slow
def test_missing_corrupt_and_foreign_checkpoints_fail_in_one_line(tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    for path, message in [(tmp_path / "missing.ckpt", "does not exist"), (foreign, "no Lethe metadata"),
                          (tmp_path / "nowhere", "does not exist"), (tmp_path, "holds no best.ckpt")]:
        with pytest.raises(LetheError, match=message):
            for ckpt in find_checkpoints(str(path)):
                load_trained_model(ckpt)
    proc = run_script("eval.py", f"ckpt={corrupt}", f"paths.log_dir={tmp_path}", check=False)  # the CLI: one line, no traceback
    assert proc.returncode == 2 and "could not be read" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]
