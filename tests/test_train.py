"""train.py and eval.py end to end: real runs on a small slice of the embedded corpus."""

import csv
import json
from pathlib import Path

import pytest
import torch

from helpers import run_script

# A small, fast slice of the stdlib corpus; every run shares its token cache.
SMALL_DATA = ["data.source.max_bytes=400000", "data.num_proc=1"]
SMOKE = ["experiment=smoke", "logger=csv", *SMALL_DATA]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def train(run_dir, data_dir, *overrides, **kwargs):
    return run_script("train.py", *SMOKE, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *overrides, **kwargs)


def train_losses(run_dir) -> dict:
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


# ---- discoverability and config errors ---------------------------------------------------
def test_help_lists_groups_and_cfg_job_prints_config():
    out = run_script("train.py", "--help").stdout
    for group in ("model", "data", "tokenizer", "optim", "scheduler", "trainer", "logger", "callbacks", "experiment"):
        assert f"{group}:" in out, group
    assert "mamba-130m" in out and "transformer-1.3b" in out and "ddp" in out
    job = run_script("train.py", "--cfg", "job", "model=transformer-tiny").stdout
    assert "_target_: lethe.models.TransformerLM" in job and "seq_len: 256" in job


@pytest.mark.parametrize("override,expected", [
    ("model.not_a_key=1", "Key 'not_a_key' is not in struct"),
    ("model=mamba-huge", "Could not find 'model/mamba-huge'"),
])
def test_unknown_keys_and_options_fail_with_hydras_message(override, expected):
    proc = run_script("train.py", override, "--cfg", "job", check=False)
    assert proc.returncode != 0 and expected in proc.stderr


@pytest.mark.parametrize("override,key", [
    ("seq_len=0", "seq_len"),
    ("model.d_state=0", "model.d_state"),
    ("optim.lr=-1", "optim.lr"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path"),
    ("trainer.max_steps=15", "trainer.max_steps"),  # the last 5 steps would never be validated or saved
    ("trainer.val_check_interval=0.5", "trainer.val_check_interval"),
    ("trainer.accumulate_grad_batches=3", "trainer.val_check_interval"),  # checkpoints mid-accumulation
])
def test_out_of_range_values_fail_in_one_line(tmp_path, data_dir, override, key):
    proc = train(tmp_path / "run", data_dir, override, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and key in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_sequence_longer_than_transformer_allows(tmp_path, data_dir):
    proc = train(tmp_path / "run", data_dir, "model=transformer-tiny", "model.max_seq_len=32", check=False)
    assert proc.returncode == 2 and "model.max_seq_len=32" in proc.stderr and "Traceback" not in proc.stderr


# ---- a real run ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    proc = train(run_dir, data_dir, "trainer.max_steps=80", "trainer.val_check_interval=40", "trainer.limit_val_batches=8",
                 "seq_len=128", "data.batch_size=8")
    return run_dir, proc


@pytest.mark.slow
def test_training_run_learns_and_writes_everything(trained_run):
    run_dir, proc = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    uniform = torch.log(torch.tensor(257.0)).item()  # byte tokenizer: 256 bytes + end-of-text
    assert metrics["val_loss"] < 0.6 * uniform, metrics  # well below the untrained model's loss
    assert metrics["test_loss"] < 0.6 * uniform
    assert abs(metrics["test_ppl"] - torch.exp(torch.tensor(metrics["test_loss"])).item()) < 1e-3 * metrics["test_ppl"]
    assert metrics["steps"] == 80 and metrics["tokens_seen"] == 80 * 8 * 128
    assert metrics["num_params"] > 0 and metrics["corpus_fingerprint"]
    assert 0 < metrics["train_time_s"] < metrics["wall_time_s"]  # not re-counted by the final validate/test
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert metrics["checkpoints"]["last"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert "val loss" in proc.stdout and "perplexity" in proc.stdout and "metrics.json" in proc.stdout
    losses = train_losses(run_dir)
    assert losses[max(losses)] < losses[min(losses)] - 1.0  # the loss curve falls


@pytest.mark.slow
def test_eval_scores_checkpoint_like_training_did(trained_run, data_dir):
    run_dir, _ = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the run scored the first 4 test batches of 8 blocks of 128 tokens (experiment=smoke): score the same blocks
    out = run_dir.parent / "eval"
    run_script("eval.py", f"ckpt={run_dir / 'checkpoints' / 'best.ckpt'}", f"paths.data_dir={data_dir}", f"out_dir={out}",
               "splits=[test]", "lengths=[]", "max_tokens=4096")
    (scores,) = [row["test"] for row in json.loads((out / "eval.json").read_text())]
    assert scores["tokens"] == metrics["test_tokens"]
    assert abs(scores["loss"] - metrics["test_loss"]) < 1e-4 and abs(scores["ppl"] - metrics["test_ppl"]) < 1e-3 * scores["ppl"]
    table = run_script("eval.py", f"sweep={run_dir}", f"out_dir={out}").stdout
    assert "| run |" in table and f"{metrics['test_ppl']:.3f}" in table


@pytest.mark.slow
def test_resume_continues_the_same_loss_curve(tmp_path, data_dir):
    mid = ["+callbacks.mid._target_=lightning.pytorch.callbacks.ModelCheckpoint", f"+callbacks.mid.dirpath={tmp_path / 'mid'}",
           "+callbacks.mid.every_n_train_steps=10", "+callbacks.mid.save_top_k=-1", "+callbacks.mid.filename='step{step}'",
           "+callbacks.mid.auto_insert_metric_name=false",
           "trainer.log_every_n_steps=1", "test_after_training=false"]
    train(tmp_path / "full", data_dir, *mid)
    ckpt = tmp_path / "mid" / "step10.ckpt"
    assert ckpt.is_file()
    train(tmp_path / "resumed", data_dir, *mid, f"ckpt_path={ckpt}")
    full, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
    later = sorted(s for s in full if s >= 10)
    assert later and sorted(resumed) == later
    for step in later:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-6), step
    # resuming into a different architecture is refused in one line, before any training
    proc = train(tmp_path / "wrong", data_dir, *mid, "model=transformer-tiny", f"ckpt_path={ckpt}", check=False)
    assert proc.returncode == 2 and "differs from the configured model" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_dir(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    run_script("train.py", "-m", *SMOKE, f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}",
               "optim.lr=1e-3,3e-3", "model=mamba-tiny,transformer-tiny", "trainer.max_steps=4",
               "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "scheduler.warmup_steps=1")
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(runs) == 4 and len({r.name for r in runs}) == 4
    configs = {(json.loads((r / "metrics.json").read_text())["model"], (r / "config.yaml").read_text().count("lr: 0.001")) for r in runs}
    assert {model for model, _ in configs} == {"MambaLM", "TransformerLM"}


@pytest.mark.slow
def test_a_failing_multirun_job_does_not_stop_the_sweep(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", *SMOKE, f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}", "seq_len=0,32",
                      "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                      "scheduler.warmup_steps=1")
    assert "error: seq_len=0 is out of range" in proc.stderr
    assert len(list(sweep.rglob("metrics.json"))) == 1
    (failed,) = [json.loads(p.read_text()) for p in sweep.rglob("failed.json")]
    assert "seq_len=0" in failed["overrides"] and failed["error"].startswith("seq_len=0 is out of range")


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    proc = train(run_dir, data_dir, "trainer=ddp", "logger=none", "trainer.max_steps=6", "trainer.val_check_interval=3",
                 "trainer.limit_val_batches=2", "scheduler.warmup_steps=1", timeout=300)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["tokens_seen"] == 6 * 4 * 64 * 2, metrics
    assert "test_loss" in metrics, proc.stdout[-2000:]


@pytest.mark.slow
def test_offline_wandb_run_is_written(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    train(run_dir, data_dir, "logger=wandb", "trainer.max_steps=4", "trainer.val_check_interval=2", "scheduler.warmup_steps=1",
          env_extra={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb")), list((run_dir / "wandb").iterdir())
    assert (run_dir / "csv" / "metrics.csv").is_file()  # the CSV copy rides along
