"""Train a Mamba language model or its Transformer++ baseline.

    python train.py                                  # mamba-tiny on the embedded corpus
    python train.py model=transformer-tiny optim.lr=1e-3
    python train.py -m optim.lr=1e-3,3e-3 model=mamba-tiny,transformer-tiny
    python train.py --help | --cfg job
"""

import os
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("LETHE_ROOT", str(ROOT))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    import math

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lethe import cli
    from lethe.errors import ConfigError
    from lethe.training.cluster import is_first_process, ranks_started_outside_lightning
    from lethe.training.resume import fold_hydra_dir, remove_if_unstarted
    from lethe.training.run import record_failure, train

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if multirun and cfg.trainer.devices not in (1, "1") and not ranks_started_outside_lightning():
            # Lightning starts DDP ranks by re-running sys.argv, which cannot nest inside a sweep
            # (ranks srun started, as in hydra/launcher=slurm with tasks per node, are fine).
            raise ConfigError(f"trainer.devices={cfg.trainer.devices} inside a multirun (-m); run each sweep job on one device")
        metrics = train(cfg)
    except BaseException as exc:
        message = cli.error_message(exc)
        if message is None:
            raise
        cli.print_error(message)
        if multirun:  # recorded as failed (failed.json; a FAIL trial for Optuna); the sweep goes on
            record_failure(cfg, message)
            return None
        remove_if_unstarted(hydra_dir)  # a run refused before it started leaves no directory behind
        sys.exit(cli.EXIT_USER_ERROR)
    finally:
        if is_first_process():  # once: every rank has the same hydra dir (checked in training)
            fold_hydra_dir(hydra_dir, Path(cfg.paths.output_dir))  # a resumed run continued in its own directory
    if metrics.get("interrupted"):  # a clean stop: the shell's 128 + signal number
        sys.exit(128 + signal.Signals[metrics["interrupted"]].value)
    val_loss = metrics.get("val_loss")
    # the objective for Hydra sweepers; None, not NaN, is what the Optuna sweeper records as a failed trial
    return val_loss if val_loss is not None and math.isfinite(val_loss) else None


if __name__ == "__main__":
    main()
