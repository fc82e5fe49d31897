"""Config checks and instantiation with one-line errors.

Hydra already rejects unknown keys and unknown group options with a clear message; this module
adds range checks on values and unwraps errors raised inside `instantiate`, so the user sees the
model's own one-line ConfigError instead of Hydra's wrapped traceback.
"""

from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from lethe.errors import ConfigError, LetheError


def instantiate(cfg, *args, **kwargs):
    """hydra.utils.instantiate, re-raising a LetheError from the constructed object as itself."""
    try:
        return hydra.utils.instantiate(cfg, *args, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, LetheError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


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
        if not ok:
            raise ConfigError(f"{key}={value!r} is out of range: expected {description}")
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
    if cfg.get("ckpt_path") and cfg.get("init_from"):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} and init_from={cfg.init_from} are exclusive: ckpt_path resumes a run, "
                          "init_from starts a new run from a checkpoint's weights; pass one")
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; point it at a .ckpt file such as <run>/checkpoints/last.ckpt")
    if cfg.get("init_from") and not Path(cfg.init_from).is_file():
        raise ConfigError(f"init_from={cfg.init_from} does not exist; point it at a Lethe .ckpt file (trained, or written by "
                          "`python -m lethe.interop import`)")
