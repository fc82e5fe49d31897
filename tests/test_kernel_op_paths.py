"""How a call reaches the fused CPU kernel: plain eager calls through a short autograd.Function,
vmap, make_fx and torch.compile (tests/test_kernels.py) through the torch.library custom op whose
batching, fake and tracing rules torch knows. Both ways give the reference's answers."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from helpers import make_inputs
from lethe.ops import kernel_build, selective_scan

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


@pytest.fixture(autouse=True)
def built_kernel():
    assert kernel_build.unavailable("cpu") is None


def test_second_derivatives_raise_instead_of_returning_zeros():
    inputs = {k: v.clone().requires_grad_() for k, v in make_inputs(1, 2, 20, 4, seed=2).items()}
    y, _ = selective_scan(**inputs, impl="cpu")
    (grad_u,) = torch.autograd.grad((y * y).sum(), inputs["u"], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        torch.autograd.grad(grad_u.sum(), inputs["u"])


def test_vmap_over_a_batch_of_calls_matches_calling_each():
    calls = [make_inputs(2, 3, 30, 4, seed=seed) for seed in range(3)]
    stacked = [torch.stack([call[name] for call in calls]) for name in NAMES]

    def scan(*tensors):
        return selective_scan(*tensors[:8], True, tensors[8], impl="cpu")

    y, last = torch.func.vmap(scan)(*stacked)
    for i, call in enumerate(calls):
        y_ref, last_ref = selective_scan(**call, impl="reference")
        torch.testing.assert_close(y[i], y_ref, rtol=6e-4, atol=2e-3)
        torch.testing.assert_close(last[i], last_ref, rtol=6e-4, atol=2e-3)


def test_make_fx_with_fake_tensors_traces_the_custom_op():
    inputs = make_inputs(1, 2, 20, 4, seed=4)

    def scan(*tensors):
        return selective_scan(*tensors[:8], True, tensors[8], impl="cpu")

    graph = make_fx(scan, tracing_mode="fake")(*(inputs[name] for name in NAMES))
    assert "lethe.selective_scan_fwd.default" in {str(node.target) for node in graph.graph.nodes}
