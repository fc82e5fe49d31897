"""Config checks and instantiation with one-line errors.

Hydra already rejects unknown keys and unknown group options with a clear message; this module
adds range checks on values, refuses a setting the instantiated class or function does not take
(`+optim.lrr=1`) by name, and unwraps errors raised inside `instantiate`, so the user sees the
model's own one-line ConfigError instead of Hydra's wrapped traceback.
"""

import functools
import inspect
import os
import re
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from lethe.errors import ConfigError, LetheError, is_int, require

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def _settings_of(target) -> str:
    """The keyword settings a callable takes, for the message that names a wrong one."""
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return ""
    # positional-only parameters are the inputs the caller passes (a corpus's cache directory), not settings
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in parameters if p.kind in kinds and p.name != "self"]
    return f" (its settings: {', '.join(names)})" if names else ""


def _unknown_setting(key: str, target, exc: TypeError) -> ConfigError | None:
    match = _UNEXPECTED.search(str(exc))
    if match is None:
        return None
    name = getattr(target, "__qualname__", str(target))
    where = f"{key}.{match.group(1)}" if key else match.group(1)
    return ConfigError(f"{where} is not a setting of {name}{_settings_of(target)}; remove it or correct its name")


def instantiate(cfg, *args, config_key: str | None = None, **kwargs):
    """hydra.utils.instantiate, re-raising a LetheError from the constructed object as itself and
    a setting the target does not take as a ConfigError naming `<config_key>.<setting>` (the key
    is read off `cfg` when it is a node of a composed config). A partial (`_partial_: true`, e.g.
    the optimizer) is checked against its target's signature now, not when it is first called."""
    if config_key is None and isinstance(cfg, DictConfig):
        config_key = cfg._get_full_key(None) or None
    target = cfg.get("_target_") if hasattr(cfg, "get") else None
    try:
        built = hydra.utils.instantiate(cfg, *args, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, LetheError):
            if isinstance(cause, TypeError) and target and (unknown := _unknown_setting(config_key, hydra.utils.get_object(target), cause)):
                raise unknown from None
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
    if isinstance(built, functools.partial):
        try:
            inspect.signature(built.func).bind_partial(*built.args, **built.keywords)
        except TypeError as exc:
            unknown = _unknown_setting(config_key, built.func, exc)
            if unknown is not None:
                raise unknown from None
    return built


def as_target_spec(spec: dict, legacy_kinds: dict, key: str) -> dict:
    """A `_target_` spec, translating the older `kind:` form (still read from old checkpoints)."""
    spec = dict(spec)
    if "_target_" in spec or "kind" not in spec:
        return spec
    kind = spec.pop("kind")
    if kind not in legacy_kinds:
        raise ConfigError(f"{key}.kind={kind!r}; choose one of {', '.join(legacy_kinds)}")
    return {"_target_": legacy_kinds[kind], **spec}


def task_overrides() -> list[str]:
    """The command line's overrides of this Hydra job (not Hydra's own), or [] outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def compose(config_name: str = "train", *overrides: str) -> DictConfig:
    """A config of conf/ composed as the scripts compose it (a model size with its family's base
    merged in, say), without Hydra's own node; no global Hydra state is left behind."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


def _count_or_fraction(v, allow_zero: bool) -> bool:
    """Lightning's limit_*_batches: a number of batches (int) or a fraction of the split (float)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return v >= (0 if allow_zero else 1)
    return (0 <= v if allow_zero else 0 < v) and v <= 1


# key -> (predicate, description of the valid range)
_RANGE_CHECKS = {
    "seed": (lambda v: v >= 0, "an integer >= 0"),
    "seq_len": (lambda v: v >= 1, "an integer >= 1"),
    "optim.lr": (lambda v: v > 0, "a number > 0"),
    "optim.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1), e.g. [0.9,0.95]"),
    "optim.eps": (lambda v: v > 0, "a number > 0, e.g. 1e-8"),
    "scheduler.warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "scheduler.min_lr": (lambda v: v >= 0, "a number >= 0"),
    "trainer.max_steps": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.accumulate_grad_batches": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.num_nodes": (lambda v: v >= 1, "an integer >= 1 (machines)"),
    "trainer.gradient_clip_val": (lambda v: v is None or v > 0, "a number > 0 or null"),
    # the training stream is endless, so validation is placed by batch count, never by epoch fraction
    "trainer.val_check_interval": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1 (training batches)"),
    # validation is what writes the checkpoints, so it never scores zero batches
    "trainer.limit_val_batches": (lambda v: _count_or_fraction(v, allow_zero=False),
                                  "an integer >= 1 (batches) or a fraction in (0, 1] of the split"),
    "trainer.limit_test_batches": (lambda v: _count_or_fraction(v, allow_zero=True),
                                   "an integer >= 0 (batches) or a fraction in [0, 1] of the split"),
    "trainer.log_every_n_steps": (lambda v: v >= 1, "an integer >= 1"),
    "data.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "data.eval_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "data.num_workers": (lambda v: v >= 0, "an integer >= 0"),
}


def _check_torchrun_ranks(cfg: DictConfig) -> None:
    """Under torchrun Lightning takes the ranks torchrun started (TorchElasticEnvironment), which
    trainer.devices x trainer.num_nodes must count: otherwise each rank trains alone (trainer.devices=1
    without DDP) or Lightning stops with a traceback."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "WORLD_SIZE" not in os.environ:
        return
    world = int(os.environ["WORLD_SIZE"])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    devices, nodes = OmegaConf.select(cfg, "trainer.devices"), OmegaConf.select(cfg, "trainer.num_nodes", default=1)
    if is_int(devices) and is_int(nodes) and (devices * nodes != world or devices != per_node):
        raise ConfigError(f"trainer.devices={devices} x trainer.num_nodes={nodes} is {devices * nodes} ranks, but torchrun "
                          f"started {world} ({world // per_node} node(s) x {per_node}); set trainer.devices to --nproc_per_node "
                          "and trainer.num_nodes to --nnodes (and trainer=ddp for more than one)")


def check_devices(cfg: DictConfig) -> None:
    """This machine has the devices the trainer asks for (validate() leaves that out: presets for
    GPUs validate anywhere)."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU; train on the CPU "
                              "with trainer=cpu (trainer=ddp for 2 processes, trainer=fsdp-cpu for FSDP)")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value is out of range."""
    for key, (valid, description) in _RANGE_CHECKS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and key != "trainer.val_check_interval":
            continue
        try:
            ok = valid(value)
        except TypeError:
            ok = False
        require(ok, key, value, description)
    warmup = OmegaConf.select(cfg, "scheduler.warmup_steps", default=0) or 0
    if warmup >= cfg.trainer.max_steps:
        raise ConfigError(
            f"scheduler.warmup_steps={warmup} must be smaller than trainer.max_steps={cfg.trainer.max_steps}"
        )
    # Checkpoints are written after each validation: validating on optimizer-step boundaries and at
    # the very last step means every checkpoint resumes exactly and the final weights are saved.
    interval, accumulate = cfg.trainer.val_check_interval, cfg.trainer.accumulate_grad_batches
    if interval % accumulate:
        raise ConfigError(
            f"trainer.val_check_interval={interval} must be a multiple of trainer.accumulate_grad_batches={accumulate} "
            "(validate and checkpoint between optimizer steps)"
        )
    if (cfg.trainer.max_steps * accumulate) % interval:
        raise ConfigError(
            f"trainer.max_steps={cfg.trainer.max_steps} x accumulate_grad_batches={accumulate} batches is not a multiple of "
            f"trainer.val_check_interval={interval}; choose them so the last step is validated and checkpointed"
        )
    _check_torchrun_ranks(cfg)
    if cfg.get("ckpt_path") and cfg.get("init_from"):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} and init_from={cfg.init_from} are exclusive: ckpt_path resumes a run, "
                          "init_from starts a new run from a checkpoint's weights; pass one")
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).exists():  # a file, or a directory of FSDP shards
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; point it at a .ckpt file such as <run>/checkpoints/last.ckpt")
    if cfg.get("init_from") and not Path(cfg.init_from).exists():
        raise ConfigError(f"init_from={cfg.init_from} does not exist; point it at a Lethe .ckpt file (trained, or written by "
                          "`python -m lethe.interop import`)")
