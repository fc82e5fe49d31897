"""Helpers shared by the test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from lethe.ops import SCAN_IMPL_CHOICES, selective_scan

ROOT = Path(__file__).resolve().parents[1]
# Scan implementations that run on CPU tensors ("cuda" needs a GPU: tests/test_kernels.py), and
# those that take float64 (the fused kernels compute in float32 and take float32/16 inputs).
CPU_SCAN_IMPLS = tuple(impl for impl in SCAN_IMPL_CHOICES if impl != "cuda")
FLOAT64_SCAN_IMPLS = ("auto", "reference", "chunked")


def run_script(script, *args, cwd=ROOT, env_extra=None, check=True, timeout=600):
    """Run one of the repository's scripts (train.py, eval.py, ...) offline in a fresh interpreter.
    env_extra adds variables; one whose value is None is removed from the script's environment."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.update(env_extra or {})
    env = {k: v for k, v in env.items() if v is not None}
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


# ---- selective-scan cases (test_scan.py, test_kernels.py) -------------------------------------
def make_inputs(batch, channels, length, d_state, dtype=torch.float32, seed=0, delta_scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return dict(
        u=randn(batch, channels, length).to(dtype),
        delta=(randn(batch, channels, length) * delta_scale - 1.0).to(dtype),
        A=-torch.exp(randn(channels, d_state) * 0.5).to(torch.float32 if dtype != torch.float64 else dtype),
        B=randn(batch, d_state, length).to(dtype),
        C=randn(batch, d_state, length).to(dtype),
        D=randn(channels).to(torch.float32 if dtype != torch.float64 else dtype),
        z=randn(batch, channels, length).to(dtype),
        delta_bias=(randn(channels) * 0.1).to(torch.float32 if dtype != torch.float64 else dtype),
        initial_state=randn(batch, channels, d_state).to(torch.float32 if dtype != torch.float64 else dtype),
    )


def run(impl, inputs, use_z, use_bias, use_state):
    """y, last state and the gradients of every input, computed on the impl's device, returned on CPU."""
    device = "cuda" if impl == "cuda" else "cpu"
    args = {k: v.detach().to(device, copy=True).requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    if not use_z:
        args.pop("z")
    if not use_bias:
        args.pop("delta_bias")
    if not use_state:
        args.pop("initial_state")
    y, last = selective_scan(**args, impl=impl)
    # a loss that weights every output and the final state, so every gradient path is exercised
    g = torch.Generator().manual_seed(1)
    weights_y, weights_last = torch.randn(y.shape, generator=g).to(device), torch.randn(last.shape, generator=g).to(device)
    loss = (y.float() * weights_y).sum() + (last * weights_last).sum()
    loss.backward()
    return y.cpu(), last.cpu(), {k: v.grad.cpu() for k, v in args.items()}
