"""The fused CPU causal conv1d (kernels/causal_conv1d_cpu.cpp) against its float64 reference:
outputs, final states and every gradient, for widths 2-4, odd and short lengths, with and without
bias, SiLU and states; bfloat16 inputs; bit-identical gradients across runs and thread counts;
torch.compile and torch.library's checks; and a whole MambaLM unchanged against F.conv1d."""

import importlib

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from helpers import document_starts, perturbed
from lethe.models import MambaLM
from lethe.ops import causal_conv1d, causal_conv1d_reference, kernel_build
from lethe.ops.documents import tap_mask

conv = importlib.import_module("lethe.ops.causal_conv1d")  # the module (lethe.ops re-exports its function)


@pytest.fixture(autouse=True)
def built():
    assert kernel_build.unavailable("conv_cpu") is None


def inputs(batch, channels, length, width, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, channels, length, generator=g).to(dtype), weight=torch.randn(channels, width, generator=g),
                bias=torch.randn(channels, generator=g), init=torch.randn(batch, channels, width - 1, generator=g))


def kernel_and_reference(case, use_bias, silu, use_init, starts=None):
    """(outputs, final state, gradients) of the kernel op and of the float64 reference, under a
    loss that weights every output and the final state."""
    activation = "silu" if silu else None
    taps = None if starts is None else tap_mask(starts, case["weight"].shape[1])
    results = []
    for op, cast in ((conv.conv_fwd_op, None), (None, torch.float64)):
        args = {k: v.detach().clone().to(cast or v.dtype).requires_grad_() for k, v in case.items()}
        bias, init = (args["bias"] if use_bias else None), (args["init"] if use_init else None)
        if op is not None:  # the op itself: also lengths the dispatcher leaves to the window's dot product
            out, final = op(args["x"], args["weight"], bias, init, taps, silu, True)
        else:
            out = causal_conv1d_reference(args["x"], args["weight"], bias, activation, initial_states=init, document_starts=starts)
            context = torch.cat([init if init is not None else args["x"].new_zeros(*args["x"].shape[:2], case["weight"].shape[1] - 1),
                                 args["x"]], dim=-1)
            final = context[:, :, context.shape[-1] - (case["weight"].shape[1] - 1):]
        g = torch.Generator().manual_seed(1)
        loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
        loss = loss + (final.double() * torch.randn(final.shape, generator=g, dtype=torch.float64)).sum()
        wrt = [args["x"], args["weight"], *([bias] if use_bias else []), *([init] if use_init else [])]
        results.append((out, final, torch.autograd.grad(loss, wrt)))
    return results


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("length", [1, 2, 3, 17, 64, 131])
@pytest.mark.parametrize("use_bias,silu,use_init", [(True, True, True), (False, True, False), (True, False, True), (False, False, False)])
@pytest.mark.parametrize("documents", [False, True])
def test_matches_the_float64_reference(width, length, use_bias, silu, use_init, documents):
    starts = document_starts(2, length, seed=length, every=5) if documents else None
    if starts is not None:
        starts[1, 0] = False  # a row whose first document began in the previous segment: it reads the state
    (out, final, grads), (ref_out, ref_final, ref_grads) = kernel_and_reference(
        inputs(2, 5, length, width, seed=length * width), use_bias, silu, use_init, starts)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), ref_final, rtol=0, atol=1e-6)  # the last inputs, as they were
    for name, got, want in zip(["x", "weight", "bias", "init"], grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


def test_bfloat16_inputs_compute_in_float32():
    case = inputs(2, 6, 50, 4, seed=3, dtype=torch.bfloat16)
    (out, final, grads), (ref_out, _, ref_grads) = kernel_and_reference(case, True, True, True)
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32 and grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-2, atol=2e-2)  # bfloat16's output rounding
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=5e-2)


def test_gradients_are_bit_identical_across_runs_and_thread_counts():
    case = inputs(4, 48, 300, 4, seed=9)

    def gradients():
        (_, _, grads), _ = kernel_and_reference(case, True, True, True)
        return grads

    threads = torch.get_num_threads()
    try:
        first, again = gradients(), gradients()
        torch.set_num_threads(1)
        single = gradients()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_the_dispatcher_takes_the_kernel_for_cpu_sequences(monkeypatch):
    calls = []
    real = conv.conv_fwd_op
    monkeypatch.setattr(conv, "conv_fwd_op", lambda *a: calls.append(a[0].shape) or real(*a))
    case = inputs(1, 3, 20, 4)
    causal_conv1d(case["x"], case["weight"], case["bias"], "silu")
    causal_conv1d(case["x"][..., :1], case["weight"], case["bias"], "silu", initial_states=case["init"])  # a decoding step
    causal_conv1d(case["x"].double(), case["weight"].double(), None, "silu")  # float64: F.conv1d (gradcheck)
    assert calls == [torch.Size([1, 3, 20])]


def test_custom_ops_pass_opcheck_and_compile_without_graph_breaks():
    case = inputs(2, 4, 19, 4, seed=5)
    args = [case["x"].requires_grad_(), case["weight"].requires_grad_(), case["bias"], case["init"], None, True, True]
    torch.library.opcheck(conv.conv_fwd_op, args)
    args[4] = tap_mask(document_starts(2, 19, seed=1), 4)
    torch.library.opcheck(conv.conv_fwd_op, args)
    traced = []

    def recording(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes)
        return lookup_backend("aot_eager")(graph_module, example_inputs)

    def f(x, w, b):
        return causal_conv1d(x, w, b, "silu").square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=recording, fullgraph=True)
    x, w, b = (case[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias"))
    compiled(x, w, b).backward()
    assert "lethe.causal_conv1d_fwd.default" in traced
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    f(x2, w2, b2).backward()
    for got, want in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want)


def test_mamba_logits_and_gradients_are_those_of_the_plain_conv(monkeypatch):
    torch.manual_seed(2)
    model = perturbed(MambaLM(vocab_size=61, d_model=32, n_layer=2, d_state=8))
    ids = torch.randint(0, 61, (2, 45))

    def logits_and_grads():
        model.zero_grad()
        logits = model(ids)
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    fused = logits_and_grads()
    monkeypatch.setattr(conv, "_use_kernel", lambda *a: False)  # F.conv1d and autograd instead
    plain = logits_and_grads()
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), fused[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("path", ["cpu-kernel", "masked-pytorch", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_packed_row_is_its_documents_convolved_alone(path, monkeypatch):
    """Documents of 5, 1 and 9 steps in one row: each one's outputs and input gradients equal
    convolving it alone from zeros (the CPU kernel, the masked PyTorch path, and on a GPU the
    causal-conv1d package's seq_idx where it has one)."""
    if path == "masked-pytorch":
        monkeypatch.setattr(conv, "_use_kernel", lambda *a: False)
    device = "cuda" if path == "cuda" else "cpu"
    lengths, case = [5, 1, 9], {k: v.to(device) for k, v in inputs(1, 3, 15, 4, seed=4).items()}
    starts = torch.zeros(1, 15, dtype=torch.bool, device=device)
    starts[0, [0, 5, 6]] = True
    x = case["x"].clone().requires_grad_()
    packed = causal_conv1d(x, case["weight"], case["bias"], "silu", document_starts=starts)
    weights = torch.randn(packed.shape, generator=torch.Generator().manual_seed(3)).to(device)
    (packed * weights).sum().backward()
    begin = 0
    for n in lengths:
        alone = case["x"][..., begin:begin + n].clone().requires_grad_()
        out = causal_conv1d_reference(alone, case["weight"], case["bias"], "silu")
        (out * weights[..., begin:begin + n]).sum().backward()
        torch.testing.assert_close(packed[..., begin:begin + n], out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad[..., begin:begin + n], alone.grad, rtol=1e-5, atol=1e-6)
        begin += n
