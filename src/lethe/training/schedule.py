"""Learning-rate schedule: linear warmup, then cosine decay to a floor (the paper's recipe)."""

import math

from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int = 100, min_lr: float = 1e-5) -> LambdaLR:
    """Linear warmup over `warmup_steps`, cosine decay to `min_lr` at `total_steps`."""
    peak = optimizer.defaults["lr"]
    ratio = min(1.0, min_lr / peak) if peak > 0 else 0.0
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, ratio))
