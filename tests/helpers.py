"""Helpers shared by the test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from lethe.ops import SCAN_IMPL_CHOICES

ROOT = Path(__file__).resolve().parents[1]
# Scan implementations that run on CPU tensors ("cuda" needs a GPU: tests/test_kernels.py), and
# those that take float64 (the fused kernels compute in float32 and take float32/16 inputs).
CPU_SCAN_IMPLS = tuple(impl for impl in SCAN_IMPL_CHOICES if impl != "cuda")
FLOAT64_SCAN_IMPLS = ("auto", "reference", "chunked")


def run_script(script, *args, cwd=ROOT, env_extra=None, check=True, timeout=600):
    """Run one of the repository's scripts (train.py, eval.py, ...) offline in a fresh interpreter."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def perturbed(model, scale=0.05):
    """The model in eval mode with every parameter moved off its init. Init leaves some at exact
    constants (norm weights 1, D 1, biases 0), where a conversion or a decoding step that forgot
    one of them would still match by luck."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()
