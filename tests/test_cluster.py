"""Sweeps on clusters through Hydra's submitit launcher (hydra/launcher=slurm|local): Lethe's
checks before anything is submitted, each a one-line error; the SLURM parameters the launcher
derives from the Trainer; and a real submitit sweep of two local jobs, end to end."""

import json

import pytest
from omegaconf import OmegaConf

from helpers import SMOKE, run_script

launchers = pytest.importorskip("hydra_plugins.lethe_launchers", reason="hydra-submitit-launcher is a dependency")

SLURM_DEFAULTS = {"tasks_per_node": 1, "nodes": 1, "timeout_min": 240, "signal_delay_s": 120, "max_num_timeout": 0,
                  "gpus_per_node": None, "gpus_per_task": None, "gres": None}


def trainer(**keys):
    return OmegaConf.create({"accelerator": "cpu", "devices": 1, "num_nodes": 1, **keys})


def test_slurm_tasks_and_gpus_follow_the_trainer():
    params = dict(SLURM_DEFAULTS)
    launchers.check_slurm(params, trainer(accelerator="gpu", devices=8, num_nodes=2))
    assert (params["tasks_per_node"], params["nodes"], params["gpus_per_node"]) == (8, 2, 8)
    params = dict(SLURM_DEFAULTS, gres="gpu:a100:4")  # the user's own GPU request is kept
    launchers.check_slurm(params, trainer(accelerator="gpu", devices=4))
    assert (params["tasks_per_node"], params["gpus_per_node"], params["gres"]) == (4, None, "gpu:a100:4")
    params = dict(SLURM_DEFAULTS)
    launchers.check_slurm(params, trainer())
    assert (params["tasks_per_node"], params["nodes"], params["gpus_per_node"]) == (1, 1, None)


@pytest.mark.parametrize("params, keys, needle", [
    ({}, {"devices": "auto"}, "trainer.devices=auto"),
    ({"tasks_per_node": 4}, {"devices": 8, "accelerator": "gpu"}, "hydra.launcher.tasks_per_node=4 but trainer.devices=8"),
    ({"nodes": 3}, {"num_nodes": 2}, "hydra.launcher.nodes=3 but trainer.num_nodes=2"),
    ({"gpus_per_node": 8}, {}, "asks SLURM for GPUs but trainer.accelerator=cpu"),
    ({"signal_delay_s": 600, "timeout_min": 10}, {}, "signal_delay_s=600 is not less than the time limit"),
    ({"max_num_timeout": 3}, {}, "max_num_timeout"),
    ({"timeout_min": None}, {}, "timeout_min=None"),
])
def test_slurm_settings_that_cannot_run_are_refused_by_name(params, keys, needle):
    with pytest.raises(launchers.ConfigError, match=None) as info:
        launchers.check_slurm({**SLURM_DEFAULTS, **params}, trainer(**keys))
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_local_jobs_run_one_process_each():
    with pytest.raises(launchers.ConfigError) as info:
        launchers.check_local({"tasks_per_node": 1, "nodes": 1, "timeout_min": 60}, trainer(devices=2))
    assert "hydra/launcher=local" in str(info.value) and "trainer.devices=1" in str(info.value)


@pytest.mark.slow
def test_launcher_errors_reach_the_prompt_in_one_line():
    proc = run_script("train.py", "-m", "hydra/launcher=slurm", "trainer.devices=2", "hydra.launcher.tasks_per_node=3", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines[-1].startswith("error: hydra.launcher.tasks_per_node=3 but trainer.devices=2")
    assert "Traceback" not in proc.stderr
    proc = run_script("train.py", "-m", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=1,2", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines[-1].startswith("error: the sweep's jobs need different SLURM shapes"), proc.stderr[-2000:]
    assert "devices=1" in lines[-1] and "devices=2" in lines[-1]
    proc = run_script("train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.partiton=gpu", check=False)
    assert proc.returncode != 0 and "Key 'partiton' not in 'SlurmQueueConf'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_sweep_of_two_jobs_through_submitit(tmp_path, data_dir):
    """hydra/launcher=local: real submitit, each job its own process with its own job id, results in the sweep's job dirs."""
    sweep = tmp_path / "sweep"
    run_script("train.py", "-m", "hydra/launcher=local", *SMOKE, f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}",
               "trainer.max_steps=6", "trainer.val_check_interval=3", "test_after_training=false", "optim.lr=1e-3,3e-3")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0_mamba-tiny", "1_mamba-tiny"]
    lrs = [OmegaConf.load(job / "config.yaml").optim.lr for job in jobs]
    assert lrs == [1e-3, 3e-3]
    assert all(json.loads((job / "metrics.json").read_text())["steps"] == 6 for job in jobs)
    job_ids = [p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]  # beside %j, the submission's own
    assert len(job_ids) == 2  # one submitit job (a process with its own id) per sweep job


# ---- SLURM restarts (lethe.training.cluster), without SLURM -------------------------------------
def fake_scontrol(tmp_path, monkeypatch, status=0):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\necho 'Invalid job id' >&2\nexit {status}\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")


def test_a_restarted_job_finds_its_run_even_after_a_node_failure(tmp_path, monkeypatch):
    """A job notes its run directory when it starts; after SLURM restarts it (a requeue, or a node
    failure with sbatch --requeue: no clean stop), it resumes from that run's last.ckpt."""
    from lethe.training import cluster

    run, logs = tmp_path / "run", tmp_path / "logs"
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cluster.record_job_run(run, logs)
    assert not logs.exists()  # outside SLURM: nothing noted
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    cluster.record_job_run(run, logs)
    assert cluster.checkpoint_of_restarted_job(logs) is None  # the first start: nothing to resume
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert cluster.checkpoint_of_restarted_job(logs) is None  # restarted before its first checkpoint: fresh
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert cluster.checkpoint_of_restarted_job(logs) == str((run / "checkpoints" / "last.ckpt").resolve())
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job: not this run
    assert cluster.checkpoint_of_restarted_job(logs) is None


@pytest.mark.parametrize("status", [0, 1])
def test_requeue_asks_scontrol_and_a_refusal_is_a_warning(status, tmp_path, monkeypatch, caplog):
    from lethe.training import cluster

    fake_scontrol(tmp_path, monkeypatch, status)
    monkeypatch.setenv("SLURM_JOB_ID", "91")
    assert cluster.requeue() == ("91" if status == 0 else None)
    assert (tmp_path / "calls").read_text() == "requeue 91\n"
    assert ("scontrol requeue failed (Invalid job id)" in caplog.text) == bool(status)
