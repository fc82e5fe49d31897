"""Faults, end to end through the scripts: nothing is lost and every bad input is one line.

Clean stops (Ctrl-C, SIGTERM, SIGUSR1) write last.ckpt and metrics.json and print the command
that resumes, which continues the same loss curve in the same directory; in a SLURM job the
time-limit warning also requeues the job, whose restart resumes by itself; last.ckpt follows every
validation even when the loss does not improve; resuming refuses changed settings; eval.py goes
on past a bad checkpoint; sweeps with failed jobs exit non-zero; refused runs leave no directory.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, SMOKE, logged, run_script, train_losses
from helpers import train_smoke as train

pytestmark = pytest.mark.slow
SHORT = ["trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.log_every_n_steps=1"]


def step_of(ckpt) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


def one_error_line(proc, *needles):
    """The run failed with status 2 and one `error:` line naming every needle, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def start_training(run_dir, data_dir, *overrides, env_extra=None):
    """train.py in the background, its output unbuffered into run_dir.parent / 'out.txt'."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           **(env_extra or {})}
    out = open(run_dir.parent / f"{run_dir.name}.out", "w+")
    args = [sys.executable, str(ROOT / "train.py"), *SMOKE, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True), out


def wait_for(out, needle, proc, timeout=180):
    start = time.time()
    while time.time() - start < timeout:
        out.seek(0)
        if needle in out.read():
            return
        assert proc.poll() is None, f"train.py ended before {needle!r}"
        time.sleep(0.2)
    raise AssertionError(f"no {needle!r} within {timeout} s")


def finish(proc, out, timeout=180) -> str:
    proc.wait(timeout=timeout)
    out.seek(0)
    return out.read()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    train(run_dir, data_dir, *SHORT)
    return run_dir


# ---- checkpoints and clean stops ---------------------------------------------------------------
def test_last_checkpoint_follows_every_validation_on_a_plateau(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    # a learning rate below float32's resolution: the validation loss stays exactly flat, never a new best
    train(run_dir, data_dir, "trainer.max_steps=30", "trainer.val_check_interval=10", "optim.lr=1e-30")
    assert len(set(logged(run_dir, "val/loss").values())) == 1
    assert step_of(run_dir / "checkpoints" / "best.ckpt") == 10 and step_of(run_dir / "checkpoints" / "last.ckpt") == 30
    # resuming the finished run trains nothing again, says so, and leaves its results alone
    before = (run_dir / "metrics.json").read_text()
    proc = train(run_dir, data_dir, "trainer.max_steps=30", "trainer.val_check_interval=10", "optim.lr=1e-30", "resume=auto")
    assert "the run has finished, nothing to resume" in proc.stdout and (run_dir / "metrics.json").read_text() == before


STOPPED = ["trainer.max_steps=40", "trainer.val_check_interval=20", "trainer.log_every_n_steps=1", "test_after_training=false"]


def stop_with(stop, run_dir, data_dir) -> tuple[dict, str]:
    """Train, send `stop` after the first validation, and return the run's metrics.json and the
    resume command it printed (after checking the exit status, metrics and last.ckpt agree)."""
    proc, out = start_training(run_dir, data_dir, *STOPPED)
    wait_for(out, "[step     20] val loss", proc)
    proc.send_signal(stop)
    text = finish(proc, out)
    assert proc.returncode == 128 + stop, text[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["interrupted"] == stop.name and 20 <= metrics["steps"] < 40
    assert step_of(run_dir / "checkpoints" / "last.ckpt") == metrics["steps"]  # the step it stopped after, saved
    (command,) = [line.removeprefix("resume with: ") for line in text.splitlines() if line.startswith("resume with: ")]
    assert command == metrics["resume_command"] and f"hydra.run.dir={run_dir}" in command and "resume=auto" in command
    return metrics, command


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR1])
def test_a_schedulers_signal_stops_cleanly(stop, tmp_path, data_dir):
    stop_with(stop, tmp_path / "run", data_dir)


def test_ctrl_c_stops_cleanly_and_the_printed_command_resumes_exactly(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    _, command = stop_with(signal.SIGINT, run_dir, data_dir)
    args = shlex.split(command)
    assert args[:2] == ["python", "train.py"]
    run_script("train.py", *args[2:])  # the printed command, as a user pastes it
    run_script("train.py", *SMOKE, f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'whole'}", *STOPPED)
    resumed, whole = train_losses(run_dir), train_losses(tmp_path / "whole")
    assert sorted(resumed) == sorted(whole) == list(range(40))  # one CSV, every step once
    assert all(resumed[s] == pytest.approx(whole[s], rel=1e-6, abs=1e-6) for s in whole)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["steps"], metrics["tokens_seen"], metrics["segments"], metrics["interrupted"]) == (40, 40 * 4 * 64, 2, None)
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and p.name not in ("run", "whole")]  # no second run directory


def slurm_job(tmp_path, **extra) -> dict:
    """The environment srun gives a one-task SLURM job 4242, with a fake scontrol that records its
    calls and, as SLURM does, sends the job SIGTERM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    # as SLURM does on a requeue: SIGTERM to the job right away (Lethe has everything written by then)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.calls'}\nkill -TERM $PPID\n")
    (bin_dir / "scontrol").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1",
            "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
            "SLURM_NODELIST": "localhost", **extra}


def test_a_slurm_time_limit_warning_requeues_the_job_and_its_restart_resumes_exactly(tmp_path, data_dir):
    """SIGUSR2 (submitit's warning; USR1 with sbatch --signal) in a SLURM job: a clean stop, then
    `scontrol requeue <job>` once (Lightning's own requeue stays off: no hpc_ckpt). SLURM restarts
    the job with the same command: even where its run directory's name would differ (a start time),
    the restart finds the requeued run and continues its loss curve exactly, in its directory."""
    logs, first = tmp_path / "logs", tmp_path / "first"
    proc, out = start_training(first, data_dir, *STOPPED, f"paths.log_dir={logs}", env_extra=slurm_job(tmp_path))
    wait_for(out, "[step     20] val loss", proc)
    proc.send_signal(signal.SIGUSR2)
    text = finish(proc, out)
    assert proc.returncode == 128 + signal.SIGUSR2, text[-3000:]
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
    assert "requeued SLURM job 4242" in text and not list(first.rglob("hpc_ckpt*"))
    (record,) = (logs / "slurm-jobs").glob("4242-*.run-dir")  # the job's run, keyed by the command's overrides
    assert record.read_text().strip() == str(first.resolve())
    stopped_at = step_of(first / "checkpoints" / "last.ckpt")

    restart = train(tmp_path / "second", data_dir, *STOPPED, f"paths.log_dir={logs}",
                    env_extra=slurm_job(tmp_path, SLURM_RESTART_COUNT="1"))
    assert f"resuming from {(first / 'checkpoints' / 'last.ckpt').resolve()}" in restart.stdout + restart.stderr
    train(tmp_path / "whole", data_dir, *STOPPED)
    resumed, whole = train_losses(first), train_losses(tmp_path / "whole")
    assert 20 <= stopped_at < 40 and sorted(resumed) == sorted(whole) == list(range(40))
    assert all(resumed[s] == pytest.approx(whole[s], rel=1e-6, abs=1e-6) for s in whole)
    assert json.loads((first / "metrics.json").read_text())["segments"] == 2 and not (tmp_path / "second").exists()
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"  # the finished restart did not requeue again


def test_a_second_ctrl_c_stops_at_once(tmp_path, data_dir):
    # steps of about a second, so the second Ctrl-C arrives while the first one's step still runs
    proc, out = start_training(tmp_path / "run", data_dir, "trainer.max_steps=40", "trainer.val_check_interval=20",
                               "data.batch_size=64", "seq_len=256")
    wait_for(out, "Epoch 0:", proc)
    proc.send_signal(signal.SIGINT)
    wait_for(out, "SIGINT: stopping after this step", proc)
    proc.send_signal(signal.SIGINT)
    start = time.time()
    text = finish(proc, out, timeout=60)
    assert proc.returncode == 1 and time.time() - start < 30, text[-2000:]  # Lightning's exit on KeyboardInterrupt
    assert "resume with:" not in text and not (tmp_path / "run" / "metrics.json").exists()


def test_nan_loss_stops_naming_where_the_weights_are(tmp_path, data_dir):
    proc = train(tmp_path / "run", data_dir, *SHORT, "optim.lr=1e4", check=False)
    line = one_error_line(proc, "training loss became nan at step 1", "no checkpoint was written yet", "lower optim.lr")
    assert "<run>" not in line


def test_resume_refuses_changed_settings_by_name(smoke_run, data_dir):
    proc = train(smoke_run, data_dir, "trainer.max_steps=30", "trainer.val_check_interval=10", "seq_len=32", "data.batch_size=8",
                 "data.cross_document=true", "resume=auto", check=False)
    one_error_line(proc, "seq_len=64 -> 32", "data.batch_size=4 -> 8", "data.cross_document=False -> True", "allow_resume_changes=true")
    assert step_of(smoke_run / "checkpoints" / "last.ckpt") == 20  # untouched


# ---- config errors leave nothing behind -------------------------------------------------------
@pytest.mark.parametrize("override,named", [("seq_len=0", "seq_len=0 is out of range"),
                                            ("+optim.lrr=1", "optim.lrr is not a setting of AdamW")])
def test_a_refused_run_leaves_no_directory(override, named, tmp_path, data_dir):
    proc = train(tmp_path / "run", data_dir, override, check=False)
    one_error_line(proc, named)
    assert not (tmp_path / "run").exists()


def test_a_sweep_whose_jobs_all_fail_exits_non_zero(tmp_path, data_dir):
    proc = run_script("train.py", "-m", *SMOKE, f"paths.data_dir={data_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                      "seq_len=0,-1", check=False)
    assert proc.returncode == 3 and "error: 2 of 2 sweep jobs failed" in proc.stderr, proc.stderr[-2000:]
    assert len(list((tmp_path / "sweep").rglob("failed.json"))) == 2


# ---- eval.py --------------------------------------------------------------------------------------
def test_eval_goes_on_past_a_bad_checkpoint(smoke_run, data_dir, tmp_path):
    (tmp_path / "corrupt.ckpt").write_bytes(b"\x00 not a checkpoint")
    good = smoke_run / "checkpoints" / "best.ckpt"
    proc = run_script("eval.py", f"ckpt=[{good},{tmp_path / 'corrupt.ckpt'}]", f"paths.data_dir={data_dir}",
                      f"out_dir={tmp_path / 'eval'}", "splits=[test]", "lengths=[]", f"paths.log_dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "1 checkpoint(s) could not be scored" in proc.stderr, proc.stderr[-2000:]
    scored, failed = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert scored["ckpt"] == str(good) and scored["test"]["tokens"] > 0
    assert failed["ckpt"] == str(tmp_path / "corrupt.ckpt") and "corrupt" in failed["error"]
    assert f"| {scored['run']} |" in proc.stdout


@pytest.mark.parametrize("lengths", ["[0]", "[-1]", "[1,0.5,0]"])
def test_eval_refuses_lengths_that_are_not_positive(lengths, smoke_run, tmp_path):
    proc = run_script("eval.py", f"ckpt={smoke_run}", f"lengths={lengths}", f"paths.log_dir={tmp_path}", check=False)
    one_error_line(proc, "lengths=", "multiples > 0")


def test_a_transformer_is_not_scored_past_its_max_seq_len(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    train(run_dir, data_dir, "model=transformer-tiny", "model.max_seq_len=64", "trainer.max_steps=4", "trainer.val_check_interval=2",
          "scheduler.warmup_steps=1")
    args = [f"ckpt={run_dir}", f"paths.data_dir={data_dir}", "splits=[test]", "lengths=[1,2]", "max_tokens=1024",
            f"paths.log_dir={tmp_path}"]
    proc = run_script("eval.py", *args, f"out_dir={tmp_path / 'a'}")
    assert "lengths 128 exceed its model.max_seq_len=64 and are not scored" in proc.stderr
    (row,) = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert [e["length"] for e in row["lengths"]] == [64]
    run_script("eval.py", *args, "past_max_seq_len=true", f"out_dir={tmp_path / 'b'}")
    (row,) = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert [e["length"] for e in row["lengths"]] == [64, 128]


def test_two_runs_of_one_name_are_told_apart_and_the_csv_holds_numbers(smoke_run, tmp_path, data_dir):
    # the same model trained again with another seed: the same run name, "smoke"
    train(tmp_path / "again", data_dir, "trainer.max_steps=4", "trainer.val_check_interval=2", "scheduler.warmup_steps=1", "seed=7")
    out = tmp_path / "eval"
    proc = run_script("eval.py", f"ckpt=[{smoke_run},{tmp_path / 'again'}]", f"paths.data_dir={data_dir}", f"out_dir={out}",
                      "splits=[test]", "lengths=[1]", "max_tokens=1024", f"paths.log_dir={tmp_path}")
    rows = json.loads((out / "eval.json").read_text())
    assert [r["label"] for r in rows] == ["smoke [run]", "smoke [again]"] and "| smoke [again] |" in proc.stdout
    import csv

    with open(out / "eval.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["params"]) for r in table] == [500_352, 500_352] and float(table[0]["test ppl"]) > 1
    assert [r["checkpoint"] for r in table] == [str(d / "checkpoints" / "best.ckpt") for d in (smoke_run, tmp_path / "again")]
    assert table[0]["tokenizer"] == "byte_level (257)"


def test_a_sweep_report_can_be_written_again(smoke_run, tmp_path):
    for _ in range(2):  # the second time the directory already holds the first report (its failed.json included)
        proc = run_script("eval.py", f"sweep={smoke_run.parent}", f"out_dir={smoke_run.parent / 'report'}", f"paths.log_dir={tmp_path}")
    assert proc.stdout.count("| run | model |") == 1 and proc.stdout.count("| MambaLM |") == 1 and "failed:" not in proc.stdout
