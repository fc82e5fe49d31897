"""Sweeps: an Optuna search (hparams_search=lr) with a failing trial, and `eval.py sweep=DIR` over it."""

import csv
import json

import pytest
import yaml

from helpers import SMOKE, run_script

SHORT = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
         "scheduler.warmup_steps=1"]


@pytest.mark.slow
def test_optuna_search_records_a_failed_trial_and_the_report_collects_it(tmp_path):
    sweep = tmp_path / "sweep"
    # sampler seed 1235 draws seq_len=0 (refused by validation: a failed trial) and then seq_len=32
    proc = run_script("train.py", "-m", "hparams_search=lr", *SMOKE, *SHORT, f"paths.data_dir={tmp_path / 'data'}",
                      f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=1235",
                      "seq_len=choice(0,32)", check=False)
    assert "error: seq_len=0 is out of range" in proc.stderr
    # every trial ran; the failed one makes the search exit non-zero (3), so a script notices
    assert proc.returncode == 3 and "error: 1 of 2 sweep jobs failed" in proc.stderr, proc.stderr[-2000:]
    (finished,) = [json.loads(p.read_text()) for p in sweep.rglob("metrics.json")]
    (failed,) = list(sweep.rglob("failed.json"))
    assert "seq_len=0" in json.loads(failed.read_text())["overrides"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(finished["val_loss"], rel=1e-6) and best["best_params"]["seq_len"] == 32
    (run_dir,) = [p.parent for p in sweep.rglob("metrics.json")]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == pytest.approx(best["best_params"]["optim.lr"])

    out = tmp_path / "report"
    report = run_script("eval.py", f"sweep={sweep}", f"out_dir={out}", f"paths.log_dir={tmp_path}").stdout
    assert f"| {run_dir.name} |" in report and "1 failed" in report and "seq_len=0" in report
    with open(out / "sweep.csv") as f:
        (row,) = list(csv.DictReader(f))
    # the CSV holds numbers, not the table's formatted text
    assert float(row["val loss"]) == pytest.approx(finished["val_loss"], rel=1e-9)
    assert float(row["lr"]) == pytest.approx(best["best_params"]["optim.lr"], rel=1e-9) and float(row["params"]) == finished["num_params"]
    with open(out / "failed.csv") as f:
        assert len(list(csv.DictReader(f))) == 1
    assert (out / "sweep.png").stat().st_size > 0
