"""Lethe's Hydra launchers (the `hydra/launcher` config group; Hydra takes launchers only from the
`hydra_plugins` package, hence this module's place): hydra-submitit-launcher's SLURM and local
launchers, with Lethe's checks made before anything is submitted, so a sweep that could not run
fails in one line at the prompt instead of hours later in the queue:

    python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu trainer=gpu optim.lr=1e-3,3e-3
    python train.py -m hydra/launcher=local optim.lr=1e-3,3e-3        # the same sweep as local processes

Each job is a SLURM job (array tasks, at most array_parallelism at once) with one task per device
(tasks_per_node and nodes follow trainer.devices and trainer.num_nodes): Lightning reads the ranks srun
started. A job stopped by the time-limit warning (signal_delay_s before the limit) requeues
itself and resumes (lethe.training.cluster).
"""

import sys

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import OmegaConf

from lethe.errors import ConfigError, is_int


def tasks_from_trainer(params: dict, trainer) -> None:
    """One SLURM task per device, and the Trainer's node count: Lightning and SLURM must agree on
    the ranks, so tasks_per_node and nodes follow trainer.devices and trainer.num_nodes."""
    devices, nodes = OmegaConf.select(trainer, "devices"), OmegaConf.select(trainer, "num_nodes", default=1)
    if not is_int(devices) or not is_int(nodes):
        raise ConfigError(f"trainer.devices={devices}, trainer.num_nodes={nodes} under a submitit launcher; give numbers "
                          "(each device is one SLURM task)")
    for key, value, follows in (("tasks_per_node", int(devices), "trainer.devices"), ("nodes", int(nodes), "trainer.num_nodes")):
        if params[key] not in (1, value):  # 1: the launcher's default, left alone
            raise ConfigError(f"hydra.launcher.{key}={params[key]} but {follows}={value}; Lightning runs one rank per "
                              f"SLURM task: set {follows} and leave hydra.launcher.{key} to follow it")
        params[key] = value
    if not is_int(params["timeout_min"]):
        raise ConfigError(f"hydra.launcher.timeout_min={params['timeout_min']}; give the job's time limit in minutes")


def check_slurm(params: dict, trainer) -> None:
    tasks_from_trainer(params, trainer)
    uses_gpus = str(trainer.accelerator) in ("gpu", "cuda")
    asks_gpus = params.get("gpus_per_node") or params.get("gpus_per_task") or params.get("gres")
    if uses_gpus and not asks_gpus:
        params["gpus_per_node"] = int(trainer.devices)  # one GPU per task: what trainer.devices asks for
    if asks_gpus and not uses_gpus:
        raise ConfigError(f"hydra.launcher asks SLURM for GPUs but trainer.accelerator={trainer.accelerator}; "
                          "train on them with trainer=gpu (or trainer.accelerator=gpu), or drop the GPU request")
    if params["signal_delay_s"] >= params["timeout_min"] * 60:
        raise ConfigError(f"hydra.launcher.signal_delay_s={params['signal_delay_s']} is not less than the time limit "
                          f"(timeout_min={params['timeout_min']}); the warning must come before the limit")
    if params["max_num_timeout"]:
        raise ConfigError("hydra.launcher.max_num_timeout turns on submitit's own requeue, which stops a run mid-step; "
                          "Lethe requeues at a step boundary by itself (callbacks.clean_stop.requeue): leave it 0")


def check_local(params: dict, trainer) -> None:
    tasks_from_trainer(params, trainer)
    if params["tasks_per_node"] != 1 or params["nodes"] != 1:
        raise ConfigError(f"trainer.devices={trainer.devices} under hydra/launcher=local: each local job runs one process; "
                          "use trainer.devices=1 (or hydra/launcher=slurm, where srun starts the ranks)")


def checked(check) -> None:
    """Run a check before submitting: a bad setting is one `error:` line and exit status 2 (Hydra
    would print the traceback of an exception raised here)."""
    from lethe.cli import EXIT_USER_ERROR, print_error

    try:
        check()
    except ConfigError as exc:
        print_error(str(exc))
        sys.exit(EXIT_USER_ERROR)


def job_shape(trainer) -> tuple:
    return str(trainer.accelerator), str(trainer.devices), str(OmegaConf.select(trainer, "num_nodes", default=1))


def sweep_trainer(launcher, job_overrides):
    """The Trainer config every job of the sweep runs with. One launch submits every job with the
    same SLURM shape, so a sweep over the accelerator, devices or nodes is refused: each job's
    config is composed (only those whose overrides could change the trainer) and compared."""
    base = launcher.config.trainer
    shapes = {job_shape(base): "the command line"}
    for overrides in job_overrides:
        if any(o.lstrip("+~").startswith(("trainer", "experiment")) for o in overrides):
            trainer = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides)).trainer
            shapes.setdefault(job_shape(trainer), " ".join(overrides))
    if len(shapes) > 1:
        listed = "; ".join(f"accelerator={a} devices={d} num_nodes={n} ({where})" for (a, d, n), where in shapes.items())
        raise ConfigError(f"the sweep's jobs need different SLURM shapes ({listed}); one launch gives every job the same "
                          "tasks, nodes and GPUs: sweep each trainer shape in its own run")
    return base


class LetheSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides, initial_job_idx):
        checked(lambda: check_slurm(self.params, sweep_trainer(self, job_overrides)))
        return super().launch(job_overrides, initial_job_idx)


class LetheLocalLauncher(LocalLauncher):
    def launch(self, job_overrides, initial_job_idx):
        checked(lambda: check_local(self.params, sweep_trainer(self, job_overrides)))
        return super().launch(job_overrides, initial_job_idx)
