"""Resuming a run where it stopped, in its own directory.

    ckpt_path=<run>/checkpoints/last.ckpt     continue that run, in <run>
    resume=auto hydra.run.dir=<run>           the same if <run>/checkpoints/last.ckpt exists, else a fresh run there

A resumed run writes into the run directory it continues: one CSV of metrics (rows past the
checkpoint's step, work a crash lost and the resumed run redoes, are dropped), one wandb run
(resumed by its id), one metrics.json whose steps, tokens and training time count every
segment. A checkpoint whose run trained on other data, tokenizer, sequence length or batch is
refused by name, unless allow_resume_changes=true says the change is meant.
"""

import csv
import shlex
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from lethe.data.datamodule import cross_document_setting
from lethe.data.tokenizer import tokenizer_fingerprint
from lethe.errors import ConfigError
from lethe.files import atomic_write
from lethe.training.checkpoint import tokenizer_from_files
from lethe.training.cluster import checkpoint_of_restarted_job

# settings whose change would make a resumed run another run: the data each step sees
SAME_RUN_KEYS = ("seq_len", "data.batch_size", "trainer.accumulate_grad_batches", "trainer.devices", "trainer.num_nodes")
# what a checkpoint from before a key was in the config ran with (trainer.num_nodes came with multi-node runs)
SAME_RUN_DEFAULTS = {"trainer.num_nodes": 1}


def run_dir_of(ckpt) -> Path | None:
    """The run directory a checkpoint was written into (<run>/checkpoints/<name>.ckpt), if any."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """ckpt_path, or with resume=auto the output directory's last.ckpt when it exists (None: start fresh)."""
    resume = cfg.get("resume")
    if resume not in (None, "auto"):
        raise ConfigError(f"resume={resume!r}; use resume=auto (continue <hydra.run.dir>/checkpoints/last.ckpt if it exists) "
                          "or ckpt_path=<file.ckpt>")
    if resume == "auto" and cfg.get("ckpt_path"):
        raise ConfigError("resume=auto and ckpt_path are exclusive: resume=auto finds the checkpoint in hydra.run.dir")
    restarted = checkpoint_of_restarted_job(cfg.paths.log_dir)
    if restarted:  # a restarted SLURM job continues the run it trained, whatever its command says
        return restarted
    if resume == "auto":
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None  # a file, or a directory of shards (FSDP)
    return cfg.get("ckpt_path")


def continue_in_place(cfg: DictConfig, ckpt_path) -> Path:
    """Point the run's outputs at the directory of the run it resumes; returns that directory."""
    run_dir = run_dir_of(ckpt_path)
    if run_dir is not None and run_dir.resolve() != Path(cfg.paths.output_dir).resolve():
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
    return Path(cfg.paths.output_dir)


def check_same_run(ckpt_path, checkpoint: dict, cfg: DictConfig, datamodule) -> None:
    """Refuse, in one line naming what changed, to resume a run with other data, tokenizer, length or batch."""
    if cfg.get("allow_resume_changes"):
        return
    meta, theirs = checkpoint["lethe"], OmegaConf.create(checkpoint["lethe"]["run_config"])
    settings = [(key, *(OmegaConf.select(c, key, default=SAME_RUN_DEFAULTS.get(key)) for c in (theirs, cfg)))
                for key in SAME_RUN_KEYS]
    changed = [f"{key}={old} -> {new}" for key, old, new in settings if old != new]
    trained, now = cross_document_setting(theirs.get("data")), cross_document_setting(cfg.get("data"))
    if trained != now:
        changed.append(f"data.cross_document={trained} -> {now}")
    if meta.get("corpus_fingerprint") != datamodule.fingerprint:
        changed.append(f"data (corpus fingerprint {meta.get('corpus_fingerprint')} -> {datamodule.fingerprint})")
    if tokenizer_fingerprint(tokenizer_from_files(meta["tokenizer_files"])) != tokenizer_fingerprint(datamodule.tokenizer):
        changed.append("tokenizer")
    if changed:
        raise ConfigError(f"ckpt_path={ckpt_path} was trained with other settings ({'; '.join(changed)}); resume with the "
                          "run's own overrides, or set allow_resume_changes=true to continue with the new ones knowingly")


def previous_wandb_id(run_dir: Path) -> str | None:
    """The id of the wandb run an earlier segment wrote under <run>/wandb/ (offline-run-<time>-<id>)."""
    runs = sorted((run_dir / "wandb").glob("*run-*-*"))
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def drop_rows_from(csv_path: Path, step: int) -> None:
    """Keep only the CSV rows of steps before `step`: the ones after were logged by work the
    resumed run redoes (between its checkpoint and a crash)."""
    if not csv_path.is_file():
        return
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if r.get("step") and int(r["step"]) < step]
    with atomic_write(csv_path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def fold_hydra_dir(hydra_dir: Path, run_dir: Path) -> None:
    """A resumed run continued in run_dir while Hydra made a fresh directory for it: move Hydra's
    record of this segment (.hydra/, its log appended to the run's) there and remove the fresh one."""
    if hydra_dir.resolve() == run_dir.resolve() or not hydra_dir.is_dir():
        return
    for log in hydra_dir.glob("*.log"):
        with open(run_dir / log.name, "ab") as out:
            out.write(log.read_bytes())
    if (hydra_dir / ".hydra").is_dir():
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        shutil.move(str(hydra_dir / ".hydra"), str(run_dir / ".hydra"))
    shutil.rmtree(hydra_dir, ignore_errors=True)


def remove_if_unstarted(run_dir: Path) -> bool:
    """Remove a run directory that holds nothing but Hydra's own record (a run refused before it
    started); True if it was removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or any(p.name != ".hydra" and p.suffix != ".log" for p in run_dir.iterdir()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def resume_command(task_overrides, run_dir: Path) -> str:
    """The command that continues this run in place: its own overrides, its directory, resume=auto."""
    dropped = ("ckpt_path=", "resume=", "hydra.run.dir=", "+ckpt_path=", "+resume=")
    kept = [o for o in task_overrides if not o.startswith(dropped)]
    return shlex.join(["python", "train.py", *kept, f"hydra.run.dir={run_dir}", "resume=auto"])
