"""Runs on clusters.

Ranks started outside Lightning (torchrun, srun) each run train.py, and so Hydra, themselves:
each composes its own config and names its own run directory, and Hydra's default one holds the
second that rank started in. Once the process group is up, check_same_run_dir refuses ranks
that do not share one (else rank 0 writes the checkpoints and the others their logs elsewhere,
and resume=auto finds last.ckpt on some ranks only).

Jobs that hit their time limit or are preempted: on SLURM, the scheduler's warning
signal (sbatch --signal=USR1@<s>, or submitit's USR2 with hydra/launcher=slurm) stops the run
cleanly at a step boundary (CleanStop), then the job requeues itself (`scontrol requeue`, as
Lightning's auto-requeue does). SLURM restarts it with the same job id and command; the restart
resumes from the run's last.ckpt in the same run directory (each job notes its run directory
under <log_dir>/slurm-jobs/): no flag needed, even where the run directory's name holds a start
time. A job SLURM requeues after a node failure (sbatch --requeue) resumes the same way, from
the last validation's checkpoint.

Lightning's own handler for the same signal is switched off (slurm_environment): it would write
an hpc_ckpt from inside the signal handler, mid-step, which does not resume exactly.
"""

import hashlib
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

import torch

from lethe.config import task_overrides
from lethe.errors import ConfigError, first_line
from lethe.files import write_text

log = logging.getLogger(__name__)

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # SLURM's warning before the limit: Lightning's and submitit's


def slurm_job_id() -> str | None:
    """This process's SLURM job (an array task has its own id); None outside SLURM."""
    return os.environ.get("SLURM_JOB_ID") or None


def is_restarted_job() -> bool:
    """SLURM counts a job's restarts (requeues) in SLURM_RESTART_COUNT."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def job_record(log_dir) -> Path | None:
    """Where this SLURM job notes the run directory it trains: <log_dir>/slurm-jobs/<job>-<key>,
    the key naming the command's overrides (a job script running several trainings, one after
    another, keeps one record each, found again by the same command when SLURM restarts it)."""
    job = slurm_job_id()
    if job is None:
        return None
    key = hashlib.sha1("\0".join(task_overrides()).encode()).hexdigest()[:12]
    return Path(log_dir) / "slurm-jobs" / f"{job}-{key}.run-dir"


def is_first_process() -> bool:
    """Rank 0 by the launcher's environment (torchrun's RANK, srun's SLURM_PROCID, the LOCAL_RANK
    of a rank Lightning started), before Lightning has set up the process group."""
    return all(int(os.environ.get(key) or 0) == 0 for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))


def record_job_run(output_dir, log_dir) -> None:
    """In a SLURM job, note which run directory it trains, so that the job restarted after a
    requeue (or a node failure, with sbatch --requeue) finds the run again."""
    record = job_record(log_dir)
    if record is not None and is_first_process():
        write_text(record, f"{Path(output_dir).resolve()}\n")


def requeue() -> str | None:
    """Ask SLURM to requeue this job (SLURM ends this process soon after: everything must be
    saved before). Returns the job id, or None (with a warning; the run stays a clean stop that
    resume=auto continues) if SLURM refused."""
    job = slurm_job_id()
    if shutil.which("scontrol") is None:
        log.warning("SLURM job %s cannot requeue itself: scontrol is not on PATH", job)
        return None
    try:
        done = subprocess.run(["scontrol", "requeue", job], timeout=60, capture_output=True, text=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("SLURM job %s: scontrol requeue failed (%s)", job, first_line(exc))
        return None
    if done.returncode:
        log.warning("SLURM job %s: scontrol requeue failed (%s)", job, first_line(done.stderr or done.stdout or "no output"))
        return None
    return job


def checkpoint_of_restarted_job(log_dir) -> str | None:
    """In a restarted SLURM job: the last.ckpt of the run it trained before (None if it has none)."""
    record = job_record(log_dir)
    if record is None or not is_restarted_job() or not record.is_file():
        return None
    last = Path(record.read_text().strip()) / "checkpoints" / "last.ckpt"
    if not last.exists():  # (a file, or a directory of shards)
        return None  # it stopped before its first checkpoint: a fresh start
    log.info("SLURM job %s restarted (restart %s): resuming from %s", slurm_job_id(), os.environ["SLURM_RESTART_COUNT"], last)
    return str(last)


def slurm_environment() -> list:
    """Trainer plugins: under SLURM, Lightning's SLURM environment without its auto-requeue handler
    (CleanStop stops and this module requeues, at a step boundary)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def ranks_started_outside_lightning() -> bool:
    """srun (SLURM) or torchrun started this process as one rank of many: Lightning spawns none."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return SLURMEnvironment.detect() or TorchElasticEnvironment.detect()


def run_dir_disagreement(run_dirs: list[str]) -> str | None:
    """The ranks' run directories (index = rank): None when they are one directory, else what differs."""
    others = [(rank, d) for rank, d in enumerate(run_dirs) if d != run_dirs[0]]
    if not others:
        return None
    rank, other = others[0]
    return (f"the {len(run_dirs)} ranks of this run have {len(set(run_dirs))} different run directories "
            f"(rank 0: {run_dirs[0]}, rank {rank}: {other})")


def check_same_run_dir(run_dir) -> None:
    """Every rank must write into the same run directory (compared as resolved paths); a no-op in
    a single process. A collective call: every rank of the process group makes it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world_size = torch.distributed.get_world_size()
    if world_size == 1:
        return
    run_dirs = [None] * world_size
    torch.distributed.all_gather_object(run_dirs, str(Path(run_dir).resolve()))
    problem = run_dir_disagreement(run_dirs)
    if problem:  # every rank sees the same list, so every rank stops with the same line
        raise ConfigError(f"{problem}; pass the same hydra.run.dir=<dir> to every rank (a directory every node "
                          "sees at the same path), e.g. hydra.run.dir=logs/train/runs/<name>")
