"""Every scan implementation against the sequential reference: outputs, final state, gradients."""

import pytest
import torch
import torch.nn.functional as F

from helpers import CPU_SCAN_IMPLS, document_starts, make_inputs, run
from lethe.errors import ConfigError
from lethe.ops import causal_conv1d, causal_conv1d_reference, selective_scan, selective_scan_ref
from lethe.ops.scan_chunked import scan_chunked

# every implementation but the reference; the CUDA kernel runs on a GPU only (`make test-gpu`)
FAST_IMPLS = [impl for impl in CPU_SCAN_IMPLS if impl != "reference"] + [pytest.param("cuda", marks=pytest.mark.gpu)]


def random_shapes(count, seed):
    """(batch, channels, length, d_state) drawn from the ranges where implementations differ:
    odd lengths, d_state not a multiple of the CPU kernel's vector width."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda low, high: int(torch.randint(low, high + 1, (1,), generator=g))  # noqa: E731
    return [(draw(1, 3), draw(1, 9), 2 * draw(1, 150) + 1, draw(1, 20)) for _ in range(count)]


SHAPES = [  # (batch, channels, length, d_state): length 1, odd lengths, around chunk boundaries
    (1, 3, 1, 1),
    (2, 5, 7, 4),
    (1, 8, 17, 16),
    (2, 4, 65, 64),  # just past the CPU kernel's 64-step chunk
    (3, 6, 129, 2),  # two CPU chunks and a step
    (1, 2, 1025, 16),  # just past the CUDA kernel's 1024-step chunk
    *random_shapes(3, seed=2026),
]


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_z,use_bias,use_state", [(True, True, True), (False, False, False), (True, False, True)])
def test_matches_reference_fp32(impl, shape, use_z, use_bias, use_state):
    inputs = make_inputs(*shape, seed=sum(shape))
    y_ref, last_ref, grads_ref = run("reference", inputs, use_z, use_bias, use_state)
    y, last, grads = run(impl, inputs, use_z, use_bias, use_state)
    torch.testing.assert_close(y, y_ref, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, last_ref, rtol=6e-4, atol=2e-3)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=6e-4, atol=2e-3, msg=f"grad of {name}")


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_document_resets_match_reference(impl, shape):
    inputs, starts = make_inputs(*shape, seed=sum(shape) + 1), document_starts(shape[0], shape[2], seed=sum(shape))
    y_ref, last_ref, grads_ref = run("reference", inputs, True, True, True, starts)
    y, last, grads = run(impl, inputs, True, True, True, starts)
    torch.testing.assert_close(y, y_ref, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, last_ref, rtol=6e-4, atol=2e-3)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=6e-4, atol=2e-3, msg=f"grad of {name}")


@pytest.mark.parametrize("impl", [*CPU_SCAN_IMPLS, pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_packed_row_is_its_documents_run_alone(impl):
    """Documents of 17, 66 and 50 steps packed into one row (the second across the CPU kernel's
    64-step chunk boundary): every output of the second and third, and every gradient reaching
    their inputs, equal running that document alone from an empty state."""
    lengths, device = [17, 66, 50], "cuda" if impl == "cuda" else "cpu"
    inputs = make_inputs(1, 4, sum(lengths), 8, seed=12)
    inputs.pop("initial_state")
    document_starts = torch.zeros(1, sum(lengths), dtype=torch.bool)
    document_starts[0, [0, 17, 83]] = True
    g = torch.Generator().manual_seed(2)
    weights = torch.randn(1, 4, sum(lengths), generator=g)

    packed_args = {k: v.detach().clone().to(device).requires_grad_() for k, v in inputs.items()}
    packed, _ = selective_scan(**packed_args, impl=impl, document_starts=document_starts.to(device))
    (packed * weights.to(device)).sum().backward()
    packed = packed.cpu()
    begin = 0
    for n in lengths:
        alone_inputs = {k: (v[..., begin:begin + n] if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
        args = {k: v.detach().clone().to(device).requires_grad_() for k, v in alone_inputs.items()}
        y, _ = selective_scan(**args, impl=impl)
        (y * weights[..., begin:begin + n].to(device)).sum().backward()
        torch.testing.assert_close(packed[..., begin:begin + n], y.cpu(), rtol=1e-5, atol=1e-5)
        for name in ("u", "delta", "B", "C", "z"):
            torch.testing.assert_close(packed_args[name].grad[..., begin:begin + n].cpu(), args[name].grad.cpu(), rtol=1e-4, atol=1e-5,
                                       msg=f"grad of {name}, document at {begin}")
        begin += n


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.bfloat16, 3e-2, 5e-2), (torch.float16, 3e-3, 5e-3)])
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_half_precision_inputs_compute_in_fp32(impl, dtype, rtol, atol):
    inputs = make_inputs(2, 6, 40, 8, dtype=dtype, seed=3)
    y_ref, last_ref, grads_ref = run("reference", inputs, True, True, True)
    y, last, grads = run(impl, inputs, True, True, True)
    assert y.dtype == dtype and last.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(last, last_ref, rtol=rtol, atol=atol)
    # the same half inputs upcast to fp32 give the fp32 answer: the math never ran in half
    fp32 = {k: v.float() for k, v in inputs.items()}
    y32, _, _ = run("reference", fp32, True, True, True)
    torch.testing.assert_close(y.float(), y32, rtol=rtol, atol=atol)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=rtol, atol=atol, msg=f"grad of {name}")


@pytest.mark.parametrize("shape", [(2, 3, 1, 2), (1, 3, 9, 3), (2, 2, 33, 2)])
def test_chunked_gradcheck_float64(shape):
    inputs = make_inputs(*shape, dtype=torch.float64, seed=7)
    args = [inputs[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C", "initial_state")]
    args[1] = F.softplus(args[1].detach()).requires_grad_()  # the raw recurrence takes delta > 0
    assert torch.autograd.gradcheck(scan_chunked, args)
    assert torch.autograd.gradcheck(lambda *a: scan_chunked(*a, None), args[:5])


def test_gradcheck_full_op_float64():
    inputs = make_inputs(1, 2, 11, 3, dtype=torch.float64, seed=11)
    names = list(inputs)
    tensors = [inputs[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(lambda *t: selective_scan(**dict(zip(names, t)), impl="chunked"), tensors)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_stable_for_long_sequences_and_extreme_delta(impl):
    # Large deltas make cumulative decays underflow; a positive-cumsum formulation would give inf/nan.
    inputs = make_inputs(1, 4, 3000, 16, seed=5, delta_scale=6.0)
    inputs["A"] = inputs["A"] * 20
    y_ref, last_ref, _ = run("reference", inputs, True, True, True)
    y, last, grads = run(impl, inputs, True, True, True)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    torch.testing.assert_close(y, y_ref, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, last_ref, rtol=6e-4, atol=2e-3)


@pytest.mark.parametrize("impl", ["chunked", "cpu"])
@pytest.mark.parametrize("delta_value", [1e4, 1e30])
def test_decays_far_below_float_range_are_zero(impl, delta_value):
    """delta * A of -1e4 or -1e30: every decay is 0 (the state forgets at once), never inf or NaN."""
    inputs = make_inputs(1, 3, 40, 16, seed=3)
    inputs["delta"] = torch.full_like(inputs["delta"], delta_value)
    args = {k: v for k, v in inputs.items() if k not in ("initial_state", "delta_bias")}
    y_ref, last_ref = selective_scan(**args, delta_softplus=False, impl="reference")
    y, last = selective_scan(**args, delta_softplus=False, impl=impl)
    assert torch.isfinite(y).all() and torch.isfinite(y_ref).all()
    torch.testing.assert_close(y, y_ref, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, last_ref, rtol=6e-4, atol=2e-3)


@pytest.mark.parametrize("impl", ["chunked", "cpu"])
def test_gradients_without_softplus_match_reference(impl):
    """delta_softplus=False: delta enters the recurrence as given (here positive), and its gradient
    skips the softplus's slope."""
    inputs = make_inputs(2, 3, 70, 5, seed=12)
    inputs["delta"] = F.softplus(inputs["delta"])

    def run_raw(name):
        args = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y, last = selective_scan(**args, delta_softplus=False, impl=name)
        ((y * y).sum() + last.sum()).backward()
        return y, {k: v.grad for k, v in args.items()}

    y_ref, grads_ref = run_raw("reference")
    y, grads = run_raw(impl)
    torch.testing.assert_close(y, y_ref, rtol=6e-4, atol=2e-3)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=6e-4, atol=2e-3, msg=f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_rounds_half_precision_like_torch(dtype):
    """On inputs exact in bfloat16/float16, the kernel's half-precision output is its float32
    output rounded by torch (round to nearest even), bit for bit: its vector conversions."""
    inputs = make_inputs(2, 5, 300, 16, seed=1)
    for name in ("u", "delta", "B", "C", "z"):
        inputs[name] = inputs[name].to(dtype)
    y_half, _ = selective_scan(**inputs, impl="cpu")
    y_float, _ = selective_scan(**{k: v.float() for k, v in inputs.items()}, impl="cpu")
    assert y_half.dtype == dtype and torch.equal(y_half, y_float.to(dtype))


def test_overflowing_decays_are_inf_like_reference():
    """delta = inf (softplus of +inf) with A > 0: exp(delta A) = inf, and with positive inputs
    every later state and output is +inf, as in the reference, not NaN. Channel 1 (A < 0) stays
    finite."""
    inputs = {k: v.abs() + 0.1 for k, v in make_inputs(1, 2, 12, 16, seed=9).items() if k != "z"}
    inputs["A"][1] = -inputs["A"][1]
    inputs["delta"][0, 0, 5] = float("inf")
    y_ref, _ = selective_scan(**inputs, impl="reference")
    y, _ = selective_scan(**inputs, impl="cpu")
    assert torch.isposinf(y_ref[0, 0, 5:]).all() and torch.isposinf(y[0, 0, 5:]).all()
    torch.testing.assert_close(y[0, 0, :5], y_ref[0, 0, :5], rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(y[0, 1], y_ref[0, 1], rtol=6e-4, atol=2e-3)


@pytest.mark.parametrize("impl", ["chunked", "cpu"])
def test_growing_states_match_reference(impl):
    """A > 0 in some channels (decays above 1), beside the usual A < 0."""
    inputs = make_inputs(2, 4, 50, 16, seed=13)
    inputs["A"][1] = inputs["A"][1].abs() * 0.05
    inputs["A"][3, ::2] *= -0.02
    y_ref, last_ref, grads_ref = run("reference", inputs, True, True, True)
    y, last, grads = run(impl, inputs, True, True, True)
    assert last_ref[:, 1].abs().max() > last_ref[:, 0].abs().max()  # channel 1 really grows
    torch.testing.assert_close(y, y_ref, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, last_ref, rtol=6e-4, atol=2e-3)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=6e-4, atol=2e-3, msg=f"grad of {name}")


@pytest.mark.parametrize("impl", ["chunked", "cpu"])
def test_state_carries_across_segments(impl):
    """Scanning [first; second] equals scanning first, then second from first's final state."""
    inputs = make_inputs(2, 4, 300, 8, seed=9)
    whole, last_whole = selective_scan(**{k: v for k, v in inputs.items() if k != "initial_state"}, impl=impl)
    split = {k: v for k, v in inputs.items() if k not in ("initial_state",)}
    first = {k: (v[..., :130] if v.dim() == 3 else v) for k, v in split.items()}
    second = {k: (v[..., 130:] if v.dim() == 3 else v) for k, v in split.items()}
    y1, state = selective_scan(**first, impl=impl)
    y2, last = selective_scan(**second, initial_state=state, impl=impl)
    torch.testing.assert_close(torch.cat([y1, y2], -1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_saves_nothing_of_size_batch_channels_length_state(impl):
    b, d, l, n = 2, 16, 64, 8
    inputs = make_inputs(b, d, l, n, seed=2)
    device = "cuda" if impl == "cuda" else "cpu"
    args = {k: v.to(device).requires_grad_() for k, v in inputs.items()}
    saved_numels = []

    def pack(t):
        saved_numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = selective_scan(**args, impl=impl)
    assert saved_numels and max(saved_numels) <= b * d * l
    # the reference, by contrast, keeps per-step states: sanity check that the hook sees them
    saved_numels.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan(**args, impl="reference")
    assert sum(saved_numels) >= b * d * l * n


def test_unknown_impl_and_bad_shapes_are_one_line_errors():
    inputs = make_inputs(1, 2, 5, 3)
    with pytest.raises(ConfigError, match="model.scan_impl='fast'"):
        selective_scan(**inputs, impl="fast")
    inputs["B"] = inputs["B"][:, :, :4]
    with pytest.raises(ValueError, match=r"B has shape \(1, 3, 4\), expected \(1, 3, 5\)"):
        selective_scan(**inputs, impl="chunked")


def test_reference_matches_closed_form_lti():
    """With constant delta, B, C the recurrence is a convolution with kernel C * exp(delta A)^k * delta B."""
    b, d, l, n = 1, 2, 12, 3
    g = torch.Generator().manual_seed(4)
    u = torch.randn(b, d, l, generator=g, dtype=torch.float64)
    delta = torch.full((b, d, l), 0.3, dtype=torch.float64)
    A = -torch.rand(d, n, generator=g, dtype=torch.float64)
    Bv, Cv = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    y, _ = selective_scan_ref(u, delta, A, Bv[None, :, None].expand(b, n, l), Cv[None, :, None].expand(b, n, l), delta_softplus=False)
    kernel = torch.stack([(Cv * torch.exp(0.3 * A * k) * 0.3 * Bv).sum(-1) for k in range(l)], -1)  # (d, l)
    expected = torch.stack(
        [sum(kernel[:, k] * u[0, :, t - k] for k in range(t + 1)) for t in range(l)], -1
    )[None]
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_reference(activation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 13, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(causal_conv1d(x, w, bias, activation), causal_conv1d_reference(x, w, bias, activation))
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d(*a, activation=activation), (x, w, bias))
    # causal: output t does not depend on inputs after t
    x2 = x.detach().clone()
    x2[..., 7] += 1.0
    out1, out2 = causal_conv1d(x.detach(), w.detach()), causal_conv1d(x2, w.detach())
    assert torch.equal(out1[..., :7], out2[..., :7]) and not torch.equal(out1[..., 7:], out2[..., 7:])
