"""Mamba-2's SSD scan: every implementation against the sequential reference (outputs, final
state, every gradient), its stability, segments, compilation, and agreement with Mamba-1's
selective_scan where the two families coincide."""

import pytest
import torch

from lethe.errors import ConfigError
from lethe.ops import selective_scan, ssd_scan, ssd_scan_ref
from lethe.ops.ssd_chunked import ssd_chunked

# every implementation but the reference; the CUDA kernel runs on a GPU only (`make test-gpu`; its
# algorithm is also checked on CPU threads by tests/test_ssd_cuda_kernel.py)
FAST_IMPLS = ["chunked", "cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def ssd_inputs(batch, length, nheads, headdim, ngroups, d_state, dtype=torch.float32, seed=0, D_shape="head"):
    """Random inputs in the ranges a trained layer sees: dt around softplus(-1..1), A in -(1..16)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    D = {"head": randn(nheads), "channel": randn(nheads, headdim), None: None}[D_shape]
    return {
        "x": randn(batch, length, nheads, headdim), "dt": randn(batch, length, nheads),
        "A": -torch.empty(nheads, dtype=torch.float64).uniform_(1, 16, generator=g).to(torch.float32 if dtype != torch.float64 else dtype),
        "B": randn(batch, length, ngroups, d_state, scale=0.5), "C": randn(batch, length, ngroups, d_state, scale=0.5),
        "D": D, "dt_bias": randn(nheads, scale=0.5) - 2,  # softplus(-2) ~ 0.13: decays well inside (0, 1)
        "initial_state": randn(batch, nheads, headdim, d_state),
    }


def document_starts(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, length, generator=g) < 0.08
    starts[0, 0] = True
    starts[-1, -1] = True
    return starts


def run(impl, inputs, starts=None, chunk_size=16, dt_limit=None, with_state=True):
    """y, last state and the gradient of a random weighting of both with respect to every input."""
    device = "cuda" if impl == "cuda" else "cpu"
    leaves = {k: v.detach().to(device).requires_grad_() for k, v in inputs.items() if v is not None}
    if not with_state:
        leaves.pop("initial_state")
    starts = None if starts is None else starts.to(device)
    y, last = ssd_scan(**leaves, dt_limit=dt_limit, impl=impl, document_starts=starts, chunk_size=chunk_size)
    g = torch.Generator().manual_seed(7)
    loss = (y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64)).sum()
    loss = loss + (last.double() * torch.randn(last.shape, generator=g, dtype=torch.float64)).sum()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    return y.cpu(), last.cpu(), {k: g.cpu() for k, g in grads.items()}


def assert_matches(result, expected, rtol=6e-4, atol=2e-3):
    (y, last, grads), (y_ref, last_ref, grads_ref) = result, expected
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(last, last_ref, rtol=rtol, atol=atol)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=rtol, atol=atol, msg=f"grad of {name}")


SHAPES = [  # (batch, length, nheads, headdim, ngroups, d_state, chunk_size)
    (1, 1, 1, 1, 1, 1, 16),  # length 1
    (2, 7, 4, 3, 2, 5, 16),  # odd length inside one chunk, two groups
    (1, 17, 2, 8, 1, 16, 16),  # one step past a chunk
    (2, 33, 6, 4, 3, 7, 8),  # several chunks, three groups
    (1, 65, 2, 16, 2, 32, 64),  # just past a 64-step chunk
    (1, 40, 1, 128, 1, 3, 13),  # headdim 128, a chunk that does not divide the length
    (1, 24, 2, 2, 1, 256, 5),  # d_state 256
    (2, 50, 4, 64, 4, 128, 32),  # the reference's headdim and d_state, ngroups = nheads
]


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("D_shape,with_state", [("head", True), ("channel", False), (None, True)])
def test_matches_reference_fp32(impl, shape, D_shape, with_state):
    *dims, chunk = shape
    inputs = ssd_inputs(*dims, seed=sum(shape), D_shape=D_shape)
    expected = run("reference", inputs, with_state=with_state)
    assert_matches(run(impl, inputs, chunk_size=chunk, with_state=with_state), expected)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_document_resets_match_reference(impl, shape):
    *dims, chunk = shape
    inputs, starts = ssd_inputs(*dims, seed=sum(shape) + 1), document_starts(dims[0], dims[1], seed=sum(shape))
    assert_matches(run(impl, inputs, starts, chunk_size=chunk), run("reference", inputs, starts))


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_dt_limit_clamps_the_step_size(impl):
    inputs = ssd_inputs(2, 19, 4, 4, 2, 6, seed=3)
    inputs["dt"] = inputs["dt"] * 4  # steps far outside the clamp on both sides
    expected = run("reference", inputs, dt_limit=(0.05, 0.2))
    assert_matches(run(impl, inputs, chunk_size=8, dt_limit=(0.05, 0.2)), expected)
    unclamped = run("reference", inputs)[0]
    assert not torch.allclose(unclamped, expected[0], atol=1e-3)  # the clamp is not a no-op here


@pytest.mark.parametrize("impl", ["reference", "chunked"])  # the fused kernels take float32 and half types
def test_float64_gradcheck(impl):
    inputs = {k: v.requires_grad_() for k, v in ssd_inputs(2, 9, 2, 3, 1, 4, dtype=torch.float64, seed=5).items()}
    starts = torch.zeros(2, 9, dtype=torch.bool)
    starts[1, 4] = True

    def scan(*args, initial_state):
        return ssd_scan(*args, initial_state=initial_state, impl=impl, document_starts=starts, chunk_size=4)

    names = ["x", "dt", "A", "B", "C", "D", "dt_bias"]
    args = [inputs[n] for n in names]
    assert torch.autograd.gradcheck(lambda *a: scan(*a, initial_state=inputs["initial_state"]), args)
    assert torch.autograd.gradcheck(lambda h0: scan(*[a.detach() for a in args], initial_state=h0), (inputs["initial_state"],))


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_in_fp32(impl, dtype):
    inputs = ssd_inputs(2, 37, 4, 8, 2, 16, dtype=dtype, seed=11)
    rounded = {k: None if v is None else v.float() for k, v in inputs.items()}  # the same values in fp32
    y, last, grads = run(impl, inputs, chunk_size=16)
    y_ref, last_ref, grads_ref = run("reference", rounded)
    assert y.dtype == dtype and last.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref, rtol=3e-2, atol=5e-2)
    torch.testing.assert_close(last, last_ref, rtol=3e-2, atol=5e-2)
    for name in grads_ref:
        torch.testing.assert_close(grads[name].float(), grads_ref[name], rtol=3e-2, atol=5e-2, msg=f"grad of {name}")


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_state_carried_across_segments_equals_one_pass(impl):
    device = "cuda" if impl == "cuda" else "cpu"
    inputs = {k: v.to(device) for k, v in ssd_inputs(2, 45, 4, 4, 2, 8, seed=13).items()}
    whole, whole_last = ssd_scan(**inputs, impl=impl, chunk_size=8)
    state, pieces = inputs["initial_state"], []
    for begin, end in [(0, 1), (1, 20), (20, 45)]:
        piece = {k: inputs[k][:, begin:end] for k in ("x", "dt", "B", "C")}
        y, state = ssd_scan(**piece, A=inputs["A"], D=inputs["D"], dt_bias=inputs["dt_bias"], initial_state=state,
                            impl=impl, chunk_size=8)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, whole_last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_long_sequences_with_fast_decays_stay_finite(impl):
    """exp is only ever taken of sums of non-positive terms: a decay that underflows is 0, not nan."""
    inputs = ssd_inputs(1, 3000, 2, 4, 1, 8, seed=17)
    inputs["dt_bias"] = torch.tensor([8.0, -8.0])  # one head forgets at once (dt*A ~ -100), one barely
    y, last, grads = run(impl, inputs, chunk_size=256)
    y_ref, last_ref, _ = run("reference", inputs)
    assert all(torch.isfinite(t).all() for t in (y, last, *grads.values()))
    torch.testing.assert_close(y, y_ref, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, last_ref, rtol=6e-4, atol=2e-3)


def test_the_families_agree_where_they_coincide():
    """Headdim 1 and one head per channel: the SSD scan is Mamba-1's selective scan with A the
    same for every state of a channel. With one group, B and C are Mamba-1's shared ones; with a
    group per head, each channel is Mamba-1 run alone with its own B and C."""
    batch, length, channels, d_state = 2, 29, 6, 5
    for ngroups in (1, channels):
        inputs = ssd_inputs(batch, length, channels, 1, ngroups, d_state, seed=19)
        x, dt, A, B, C, D, dt_bias, h0 = (inputs[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"))
        y, last = ssd_scan(x, dt, A, B, C, D, dt_bias, initial_state=h0, impl="chunked", chunk_size=8)
        for group in range(ngroups):
            chans = slice(None) if ngroups == 1 else slice(group, group + 1)
            y1, last1 = selective_scan(
                x[:, :, chans, 0].mT, dt[:, :, chans].mT, A[chans, None].expand(-1, d_state), B[:, :, group].mT,
                C[:, :, group].mT, D=D[chans], delta_bias=dt_bias[chans], delta_softplus=True,
                initial_state=h0[:, chans, 0], impl="reference",
            )
            torch.testing.assert_close(y[:, :, chans, 0].mT, y1, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(last[:, chans, 0], last1, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_chunked_compiles_with_fullgraph():
    inputs = ssd_inputs(2, 40, 4, 8, 2, 16, seed=23)
    starts = document_starts(2, 40, seed=23)

    def step(x, dt, A, B, C, D, dt_bias, initial_state):
        y, last = ssd_chunked(x, dt, A, B, C, D, dt_bias, True, None, initial_state, starts, chunk_size=16)
        return (y * y).sum() + last.sum()

    names = ["x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"]
    eager_args = [inputs[n].clone().requires_grad_() for n in names]
    compiled_args = [inputs[n].clone().requires_grad_() for n in names]
    eager = step(*eager_args)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled_args)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for name, a, b in zip(names, compiled_args, eager_args):
        torch.testing.assert_close(a.grad, b.grad, msg=f"grad of {name}")


def test_bad_shapes_and_impls_are_named():
    inputs = ssd_inputs(1, 5, 4, 2, 2, 3)
    with pytest.raises(ValueError, match="ngroups=3 must divide nheads=4"):
        ssd_scan(**{**inputs, "B": torch.zeros(1, 5, 3, 3), "C": torch.zeros(1, 5, 3, 3)})
    with pytest.raises(ValueError, match="dt has shape"):
        ssd_scan(**{**inputs, "dt": torch.zeros(1, 5, 3)})
    with pytest.raises(ValueError, match="chunk_size=0"):
        ssd_scan(**inputs, chunk_size=0)
    with pytest.raises(ConfigError, match="model.scan_impl='fast'"):
        ssd_scan(**inputs, impl="fast")


def test_reference_is_the_recurrence_written_out():
    """Two steps by hand: H_1 = dt_1 x_1 B_1^T, H_2 = exp(dt_2 A) H_1 + dt_2 x_2 B_2^T, y = H C + D x."""
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]]])  # (1, 2, 1 head, headdim 2)
    dt = torch.tensor([[[0.5], [0.25]]])
    A, D = torch.tensor([-2.0]), torch.tensor([0.5])
    B = torch.tensor([[[[1.0, 0.0, 2.0]], [[0.0, 1.0, 1.0]]]])  # (1, 2, 1 group, d_state 3)
    C = torch.tensor([[[[1.0, 1.0, 0.0]], [[2.0, 0.0, 1.0]]]])
    y, last = ssd_scan_ref(x, dt, A, B, C, D, dt_softplus=False)
    H1 = 0.5 * torch.outer(x[0, 0, 0], B[0, 0, 0])
    H2 = torch.exp(torch.tensor(0.25 * -2.0)) * H1 + 0.25 * torch.outer(x[0, 1, 0], B[0, 1, 0])
    torch.testing.assert_close(y[0, :, 0], torch.stack([H1 @ C[0, 0, 0], H2 @ C[0, 1, 0]]) + 0.5 * x[0, :, 0])
    torch.testing.assert_close(last[0, 0], H2)
