"""`make zoo`, run for real at smoke scale: the four families trained by one Hydra multirun on the
same data order and tokens, then one eval.py report with parameters, throughput, decoding state
memory, perplexities and the two plots."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, SMOKE

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")]


def test_make_zoo_trains_the_four_families_alike_and_reports_them(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "LETHE_ROOT": str(tmp_path)}  # data cache and eval's log directory: not in the repository
    args = " ".join([*SMOKE, "trainer.val_check_interval=5"])
    proc = subprocess.run(["make", "-o", ".venv/.installed-stamp", "zoo", f"PYTHON={sys.executable}", "ZOO_STEPS=10",
                           f"EXP_DIR={tmp_path / 'zoo'}", f"ARGS={args}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "zoo" / "eval" / "eval.json").read_text())
    assert sorted(r["model"] for r in rows) == ["HybridLM", "Mamba2LM", "MambaLM", "TransformerLM"]
    assert {r["tokens_trained"] for r in rows} == {10 * 4 * 64}  # the same token budget
    params = [r["params"] for r in rows]
    assert max(params) <= 1.05 * min(params)  # parameter-matched presets
    by_model = {r["model"]: r for r in rows}
    # decoding state at the training length (64): the Transformer's KV cache is its 2 layers' keys
    # and values; the hybrid's one attention layer holds half of that beside 3 Mamba-2 layers'
    # conv windows (3 x (256 + 2 x 128)) and states (8 heads x 32 x 128); Mamba's is the same at any length
    kv = 2 * 2 * 64 * 128 * 4 / 2**20
    assert by_model["TransformerLM"]["state_mb"] == pytest.approx(kv)
    assert by_model["HybridLM"]["state_mb"] == pytest.approx(kv / 2 + 3 * (3 * 512 + 8 * 32 * 128) * 4 / 2**20)
    assert by_model["MambaLM"]["state_mb"] == pytest.approx(4 * 256 * (3 + 16) * 4 / 2**20)
    assert all(r["train_tokens_per_s"] > 0 for r in rows)
    assert all(e["ppl"] > 1 for r in rows for e in r["lengths"]) and len(rows[0]["lengths"]) == 5
    for png in ("ppl_vs_length.png", "val_curves.png"):
        assert (tmp_path / "zoo" / "eval" / png).stat().st_size > 10_000
    assert "state MB" in proc.stdout and "train tok/s" in proc.stdout
