"""One training run, from a composed config to metrics.json: what `train.py` executes.

    data module -> tokenizer -> model -> LightningModule -> Trainer.fit -> validate/test best
"""

import json
import logging
import signal
import time
import warnings
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from lethe.config import check_devices, instantiate, task_overrides, validate
from lethe.data import tokenizer_fingerprint
from lethe.errors import ConfigError, DataError
from lethe.files import write_json
from lethe.metrics import perplexity
from lethe.models import model_target
from lethe.models.flops import format_flops, training_flops_per_token
from lethe.models.matching import describe
from lethe.training.callbacks import CleanStop, ThroughputMonitor
from lethe.training.checkpoint import (
    AtomicCheckpointIO,
    model_state,
    read_checkpoint,
    tokenizer_files,
    tokenizer_from_files,
)
from lethe.training.cluster import REQUEUE_SIGNALS, record_job_run, requeue, slurm_environment, slurm_job_id
from lethe.training.module import LanguageModelTask
from lethe.training.resume import (
    check_same_run,
    checkpoint_to_resume,
    continue_in_place,
    drop_rows_from,
    previous_wandb_id,
    resume_command,
    run_dir_of,
)

log = logging.getLogger(__name__)
# Lightning 2.6 against torch 2.13's pytree: a deprecation inside Lightning, not a user's concern
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
# a run resumed in place writes into its own checkpoints/ again: that is the point, not a mistake
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def build_datamodule(cfg: DictConfig):
    tokenizer = OmegaConf.to_container(cfg.tokenizer, resolve=True)
    return instantiate(cfg.data, tokenizer=tokenizer, seq_len=cfg.seq_len, cache_dir=cfg.paths.data_dir, _recursive_=False)


def model_config(cfg: DictConfig, vocab_size: int) -> tuple[dict, dict | None]:
    """The model to build, and with baseline=matched the matching report (None otherwise)."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if not cfg.get("baseline"):
        return model_cfg, None
    return instantiate(cfg.baseline)(model_cfg, vocab_size)


def build_model(cfg: DictConfig, vocab_size: int, model_cfg: dict | None = None):
    model = instantiate(model_cfg or cfg.model, vocab_size=vocab_size, config_key="model", _convert_="all")
    model.check_length(cfg.seq_len, "seq_len", "lower seq_len or raise model.max_seq_len")
    return model


def check_same_model(key: str, path, meta: dict, model, fix: str) -> None:
    """The checkpoint named by config key `key` (its `lethe` metadata) must hold the configured
    model's class and constructor arguments; else a one-line error listing what differs, then `fix`."""
    if meta["model_target"] != model_target(model) or meta["model_config"] != model.config:
        changed = sorted(k for k in set(meta["model_config"]) | set(model.config)
                         if meta["model_config"].get(k) != model.config.get(k))
        raise ConfigError(
            f"{key}={path} holds a {meta['model_target'].rsplit('.', 1)[-1]} that differs from the configured model "
            f"(differs in: {', '.join(changed) or 'class'}); {fix}"
        )


def check_resumable(ckpt_path, meta: dict, model) -> None:
    """The checkpoint (its `lethe` metadata) must be a training run's (imported weights have no
    state to resume) and hold the same architecture as the configured model."""
    if meta.get("run_config") is None:
        raise ConfigError(f"ckpt_path={ckpt_path} holds weights only (no optimizer, step or data position to resume); "
                          f"start a new run from them with init_from={ckpt_path}")
    check_same_model("ckpt_path", ckpt_path, meta, model, "resume with the run's own model overrides")


def load_initial_weights(init_from, model, tokenizer) -> None:
    """Start a fresh run from a checkpoint's weights (trained or imported), refusing one whose
    tokenizer or architecture differs from the configured run's."""
    checkpoint = read_checkpoint(init_from)
    meta = checkpoint["lethe"]
    theirs = tokenizer_from_files(meta["tokenizer_files"])
    if tokenizer_fingerprint(theirs) != tokenizer_fingerprint(tokenizer):
        raise ConfigError(
            f"init_from={init_from} was saved with a different tokenizer ({len(theirs)} tokens) than the configured one "
            f"({len(tokenizer)}); train with its tokenizer: tokenizer=gpt-neox tokenizer.name=<a directory with its "
            "tokenizer.json, e.g. the transformers directory it was imported from or exported to>"
        )
    check_same_model("init_from", init_from, meta, model, "choose the model overrides it was built with "
                     "(e.g. model=mamba-130m for state-spaces/mamba-130m-hf)")
    model.load_state_dict(model_state(checkpoint))


def _instantiate_all(group) -> list:
    """Instantiate every non-null entry of a dict-of-configs group (callbacks, logger)."""
    return [instantiate(entry) for entry in (group or {}).values() if entry is not None and "_target_" in entry]


def train(cfg: DictConfig) -> dict:
    validate(cfg)
    check_devices(cfg)
    # Lightning prints through its own handler; Hydra's root handler would print each line twice.
    logging.getLogger("lightning.pytorch").propagate = False
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the seed is in the saved config
    started = time.perf_counter()
    ckpt_path = checkpoint_to_resume(cfg)
    output_dir = continue_in_place(cfg, ckpt_path) if ckpt_path else Path(cfg.paths.output_dir)
    record_job_run(output_dir, cfg.paths.log_dir)

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model_cfg, matched = model_config(cfg, datamodule.vocab_size)
    model = build_model(cfg, datamodule.vocab_size, model_cfg)
    if matched:
        log.info("%s %s", cfg.run_name, describe(matched))
    previous = {}  # metrics.json of the segments before this one
    if ckpt_path:
        checkpoint = read_checkpoint(ckpt_path)
        check_resumable(ckpt_path, checkpoint["lethe"], model)
        check_same_run(ckpt_path, checkpoint, cfg, datamodule)
        if checkpoint["global_step"] >= cfg.trainer.max_steps:
            print(f"{ckpt_path} holds step {checkpoint['global_step']} of trainer.max_steps={cfg.trainer.max_steps}: the run "
                  "has finished, nothing to resume (raise trainer.max_steps to train on)", flush=True)
            return _read_json(output_dir / "metrics.json")
        if run_dir_of(ckpt_path) == output_dir:
            previous = _read_json(output_dir / "metrics.json")
            drop_rows_from(output_dir / "csv" / "metrics.csv", checkpoint["global_step"])
            if OmegaConf.select(cfg, "logger.wandb") is not None and not cfg.logger.wandb.get("id"):
                with open_dict(cfg):
                    cfg.logger.wandb.id = previous_wandb_id(output_dir)  # one wandb run across segments
    if cfg.init_from:
        load_initial_weights(cfg.init_from, model, datamodule.tokenizer)
    if cfg.compile:
        model.compile()

    run_config = OmegaConf.to_container(cfg, resolve=True)
    task = LanguageModelTask(
        model,
        optimizer=instantiate(cfg.optim),
        scheduler=instantiate(cfg.scheduler),
        tokenizer_files=tokenizer_files(datamodule.tokenizer),
        corpus_fingerprint=datamodule.fingerprint,
        run_config=run_config,
    )
    callbacks = _instantiate_all(cfg.callbacks)
    loggers = _instantiate_all(cfg.logger)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO(), *slurm_environment()])
    for split in ("val", "test"):  # an empty shard would leave the other ranks waiting in the loss all-reduce
        if datamodule.num_blocks(split) < trainer.world_size:
            raise DataError(f"the {split} split has {datamodule.num_blocks(split)} blocks, fewer than the "
                            f"{trainer.world_size} processes; lower seq_len or trainer.devices, or add data")
    for logger in loggers:
        logger.log_hyperparams(run_config)

    flops_per_token = training_flops_per_token(model, cfg.seq_len)
    if trainer.is_global_zero:
        log.info("model %s: %s parameters, %s/token to train at seq_len %d", cfg.run_name, f"{model.num_params():,}",
                 format_flops(flops_per_token), cfg.seq_len)
        for line in model.describe_layers():
            log.info("  %s", line)
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    checkpoints = _checkpoint_paths(trainer)  # before validate/test restore an older callback state
    clean_stop = next((c for c in callbacks if isinstance(c, CleanStop)), None)
    stop = clean_stop.signal if clean_stop else None

    results = {}
    if cfg.test_after_training and not stop:
        best = checkpoints.get("best")  # None without checkpointing: score the weights in memory
        # callback_metrics, not the returned dicts: the final val score is kept out of the loggers
        trainer.validate(task, datamodule=datamodule, ckpt_path=best, verbose=False)
        results.update(_scores(trainer.callback_metrics, "val"))
        trainer.test(task, datamodule=datamodule, ckpt_path=best, verbose=False)
        results.update(_scores(trainer.callback_metrics, "test"))

    throughput = next((c for c in callbacks if isinstance(c, ThroughputMonitor)), None)
    metrics = {
        "run_name": cfg.run_name,
        "model": type(model).__name__,
        "model_config": model.config,
        "num_params": model.num_params(),
        "num_params_non_embedding": model.num_params(exclude_embedding=True),
        "steps": trainer.global_step,
        # tokens and training time count every segment of a resumed run (ThroughputMonitor's state);
        # wall time is this segment's, from start-up to the summary
        "tokens_seen": throughput.summary.get("tokens_seen") if throughput else None,
        "train_time_s": throughput.summary.get("train_time_s") if throughput else None,
        # training steps alone (no validation or checkpoints), this segment's
        "train_tokens_per_s": throughput.summary.get("train_tokens_per_s") if throughput else None,
        # analytic, lethe.models.flops: training FLOPs per token at seq_len, and the job's model TFLOP/s
        "flops_per_token": flops_per_token,
        "train_tflops": throughput.summary.get("train_tflops") if throughput else None,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "segments": previous.get("segments", 1) + 1 if previous else 1,
        "corpus_fingerprint": datamodule.fingerprint,
        "init_from": cfg.init_from,
        "matched": matched,
        "checkpoints": checkpoints,
        "interrupted": stop.name if stop else None,
        **results,
    }
    if stop:
        metrics["resume_command"] = resume_command(task_overrides(), output_dir)
    requeue_job = bool(stop in REQUEUE_SIGNALS and clean_stop.requeue and slurm_job_id() and checkpoints.get("last"))
    if requeue_job:  # SLURM's SIGTERM follows the requeue at once: finish writing first (its KILL comes KillWait later)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if trainer.is_global_zero:
        write_json(output_dir / "metrics.json", metrics)
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
        print_summary(metrics, output_dir, loggers)
    _finish_wandb(loggers)
    if trainer.world_size > 1:  # no rank exits (srun -K ends the others) before rank 0 has written
        trainer.strategy.barrier("lethe.run_written")
    if requeue_job and trainer.is_global_zero and (job := requeue()):
        print(f"requeued SLURM job {job}: it restarts with the same command and resumes from {checkpoints['last']}", flush=True)
    return metrics


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def record_failure(cfg: DictConfig, error: str) -> None:
    """failed.json in the run directory: a sweep's report lists the trial as failed, with why."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "failed.json", {"run_name": cfg.run_name, "error": error, "overrides": task_overrides()})
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)


def _checkpoint_paths(trainer) -> dict:
    ckpt = trainer.checkpoint_callback
    if ckpt is None:
        return {}
    return {"best": ckpt.best_model_path or None, "last": ckpt.last_model_path or None}


def _scores(metrics: dict, stage: str) -> dict:
    if f"{stage}/loss" not in metrics:
        return {}
    loss = float(metrics[f"{stage}/loss"])
    return {f"{stage}_loss": loss, f"{stage}_ppl": perplexity(loss), f"{stage}_tokens": int(metrics[f"{stage}/tokens"]),
            f"{stage}_acc": float(metrics[f"{stage}/acc"])}


def _finish_wandb(loggers):
    # WandbLogger(offline=True) leaves a live run and WANDB_MODE in the environment: close the
    # run so the next multirun job starts its own.
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()


def print_summary(metrics: dict, output_dir: Path, loggers) -> None:
    lines = [
        f"run          {metrics['run_name']} ({metrics['model']}, {metrics['num_params']:,} parameters)",
        f"trained      {metrics['steps']} steps, {metrics['tokens_seen'] or 0:,} tokens, "
        f"{metrics['train_time_s'] or metrics['wall_time_s']:.0f} s of training"
        + (f" in {metrics['segments']} segments" if metrics.get("segments", 1) > 1 else ""),
    ]
    for stage in ("val", "test"):
        if f"{stage}_loss" in metrics:
            lines.append(
                f"{stage:<13}loss {metrics[f'{stage}_loss']:.4f}  perplexity {metrics[f'{stage}_ppl']:.3f}"
                f"  ({metrics[f'{stage}_tokens']:,} tokens)"
            )
    if metrics.get("matched"):
        lines.append(f"baseline     {describe(metrics['matched'])}")
    ckpts = metrics["checkpoints"]
    if ckpts.get("best"):
        lines.append(f"checkpoint   {ckpts['best']}")
    lines.append(f"metrics      {output_dir / 'metrics.json'}")
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            run_dir = Path(logger.experiment.dir).parent if logger.experiment else None
            lines.append(f"wandb        {run_dir}")
            if run_dir is not None and metrics.get("segments", 1) > 1:  # one offline directory per segment, one run id
                run_dir = run_dir.parent / f"*-{run_dir.name.rsplit('-', 1)[-1]}"
            lines.append(f"             upload it with: wandb sync {run_dir}")
    if metrics.get("interrupted"):
        lines.append(f"stopped      by {metrics['interrupted']} after step {metrics['steps']}; last.ckpt holds it")
    width = min(100, max(map(len, lines)))
    print("\n" + "=" * width + "\n" + "\n".join(lines) + "\n" + "=" * width, flush=True)
    if metrics.get("interrupted"):  # one line, whole, for copying
        print(f"resume with: {metrics['resume_command']}", flush=True)
