"""The fused CPU SSD kernel (lethe.ops.ssd_cpu, kernels/ssd_cpu.cpp) against the sequential
reference: outputs, final state and every gradient, at shapes around its vector width and chunk
length; half-precision inputs; bit-identical gradients run to run and for any thread count; and
torch.compile through its custom op."""

import pytest
import torch

from helpers import document_starts
from lethe.ops import kernel_build, ssd_cpu
from lethe.ops.ssd_cpu import CHUNK, ssd_fused_cpu
from lethe.ops.ssd_reference import prepare_dt, ssd_scan_ref

NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


@pytest.fixture(autouse=True)
def built_kernel():
    assert kernel_build.unavailable("ssd_cpu") is None


def make_inputs(batch, length, nheads, headdim, ngroups, d_state, D="head", initial=True, dtype=torch.float32, seed=0,
                dt_shift=-1.0):
    """x, B, C in `dtype`; dt prepared (softplus of dt + bias), the rest float32. D: None, "head"
    (nheads,) or "channel" (nheads, headdim). dt_shift moves dt before the softplus: +2 gives decays
    strong enough to end the kernel's scaled segments inside a chunk."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    D_shape = {None: None, "head": (nheads,), "channel": (nheads, headdim)}[D]
    return dict(
        x=randn(batch, length, nheads, headdim).to(dtype),
        dt=prepare_dt(randn(batch, length, nheads) + dt_shift, 0.1 * randn(nheads), True, None, torch.float32),
        A=-torch.exp(0.5 * randn(nheads)),
        B=randn(batch, length, ngroups, d_state).to(dtype),
        C=randn(batch, length, ngroups, d_state).to(dtype),
        D=None if D_shape is None else randn(*D_shape),
        initial_state=randn(batch, nheads, headdim, d_state) if initial else None,
    )


def run(impl, inputs, starts=None, use_y=True, use_last=True):
    """y, the last state and the gradient of every input given, under a loss that weights every
    output element (y, the last state, or both)."""
    args = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    if impl == "reference":
        # the reference on the same values in float32 (bfloat16 inputs: their rounded values)
        ref_args = {k: v if v is None or v.dtype == torch.float32 else v.float() for k, v in args.items()}
        y, last = ssd_scan_ref(**ref_args, dt_softplus=False, document_starts=starts)
    else:
        y, last = ssd_fused_cpu(**args, document_starts=starts)
    g = torch.Generator().manual_seed(1)
    # weights y's dtype holds exactly, so both sides get the same gradient of y
    weights_y = torch.randn(y.shape, generator=g).to(inputs["x"].dtype).float()
    weights_last = torch.randn(last.shape, generator=g)
    terms = [(y.float() * weights_y).sum()] * use_y + [(last * weights_last).sum()] * use_last
    sum(terms).backward()  # an output not in the loss gets no gradient at all (None), not zeros
    return y, last, {k: v.grad for k, v in args.items() if v is not None}


def assert_matches(got, want, rtol=6e-4, atol=2e-3):
    (y, last, grads), (y_ref, last_ref, grads_ref) = got, want
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(last, last_ref, rtol=rtol, atol=atol)
    assert grads.keys() == grads_ref.keys()
    for name, grad_ref in grads_ref.items():
        if grad_ref is None:  # an input the reference's loss does not reach (C, D when only the last state counts)
            grad_ref = torch.zeros_like(grads[name])
        assert grads[name].dtype == grad_ref.dtype  # the input's
        torch.testing.assert_close(grads[name].float(), grad_ref.float(), rtol=rtol, atol=atol, msg=f"grad of {name}")


def random_shapes(count, seed):
    """(batch, length, nheads, headdim, ngroups, d_state) drawn from where the kernel's loops differ:
    odd lengths across chunk boundaries, headdim odd or even, d_state not a multiple of 8."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda low, high: int(torch.randint(low, high + 1, (1,), generator=g))  # noqa: E731
    shapes = []
    for _ in range(count):
        ngroups = draw(1, 2)
        shapes.append((draw(1, 3), 2 * draw(1, 75) + 1, ngroups * draw(1, 3), draw(1, 70), ngroups, draw(1, 40)))
    return shapes


SHAPES = [  # (batch, length, nheads, headdim, ngroups, d_state)
    (1, 1, 1, 1, 1, 1),
    (2, 7, 2, 3, 1, 5),
    (1, CHUNK + 1, 4, 16, 2, 16),  # just past a chunk, two groups
    (2, 2 * CHUNK + 1, 2, 8, 1, 9),  # two chunks and a step, d_state past a vector
    (1, CHUNK + 2, 3, 128, 3, 7),  # headdim 128, a group per head
    (1, 33, 2, 5, 1, 256),  # d_state 256
    (1, 2 * CHUNK + 2, 2, 64, 1, 128),  # the benchmark's head and state
    *random_shapes(3, seed=2026),
]
# (D, initial_state, document starts)
OPTIONS = [(None, False, False), ("head", True, False), ("channel", True, True), ("head", False, True)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("D,initial,docs", OPTIONS)
def test_matches_reference_fp32(shape, D, initial, docs):
    inputs = make_inputs(*shape, D=D, initial=initial, seed=sum(shape))
    starts = document_starts(shape[0], shape[1], seed=sum(shape), every=10) if docs else None
    assert_matches(run("cpu", inputs, starts), run("reference", inputs, starts))


@pytest.mark.parametrize("docs", [False, True])
def test_strong_decays_match_reference(docs):
    """Decays of ~exp(-2) a step: the kernel's scaled state restarts within chunks, not only at their starts."""
    shape = (2, 3 * CHUNK + 5, 2, 12, 1, 20)
    inputs = make_inputs(*shape, D="channel", dt_shift=2.0, seed=5)
    starts = document_starts(shape[0], shape[1], seed=6, every=30) if docs else None
    assert_matches(run("cpu", inputs, starts), run("reference", inputs, starts))


@pytest.mark.parametrize("use_y,use_last", [(True, False), (False, True)])
def test_one_output_unused(use_y, use_last):
    """An output left out of the loss reaches the op's backward as None (for the last state, the
    kernel too): the gradients still match."""
    inputs = make_inputs(2, CHUNK + 3, 2, 8, 1, 12, seed=3)
    assert_matches(run("cpu", inputs, use_y=use_y, use_last=use_last),
                   run("reference", inputs, use_y=use_y, use_last=use_last))


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.bfloat16, 3e-2, 5e-2), (torch.float16, 3e-3, 5e-3)])
def test_half_precision_inputs_compute_in_fp32(dtype, rtol, atol):
    """bfloat16 / float16 x, B, C against the float32 reference on the same rounded values: y and
    the gradients of x, B, C come back in the inputs' dtype, the math in between is float32."""
    shape = (2, CHUNK + 9, 4, 24, 2, 20)
    inputs = make_inputs(*shape, D="channel", dtype=dtype, seed=9)
    starts = document_starts(shape[0], shape[1], seed=9)
    got = run("cpu", inputs, starts)
    assert got[0].dtype == dtype
    assert_matches(got, run("reference", inputs, starts), rtol=rtol, atol=atol)


DETERMINISM_SHAPES = [
    (2, 2 * CHUNK + 22, 4, 16, 2, 24),  # two (batch, group) pairs of two heads each
    (1, CHUNK + 66, 8, 8, 1, 16),  # one pair: eight units of one head, their dB/dC added in order
]


@pytest.mark.parametrize("shape", DETERMINISM_SHAPES)
def test_bit_identical_across_runs_and_thread_counts(shape):
    inputs = make_inputs(*shape, D="channel", seed=11)
    starts = document_starts(shape[0], shape[1], seed=11)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (2, 2, 1):
            torch.set_num_threads(n)
            y, last, grads = run("cpu", inputs, starts)
            results.append([y, last, *grads.values()])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_compiled_fullgraph_matches_eager():
    inputs = make_inputs(2, CHUNK + 5, 2, 8, 1, 12, D="channel", seed=13)
    starts = document_starts(2, CHUNK + 5, seed=13)

    def loss(x, dt, A, B, C, D, initial_state):
        y, last = ssd_fused_cpu(x, dt, A, B, C, D, initial_state, starts)
        return (y * y).sum() + last.sum()

    def value_and_grads(fn):
        args = [inputs[name].detach().clone().requires_grad_() for name in NAMES]
        value = fn(*args)
        value.backward()
        return value, [a.grad for a in args]

    value, grads = value_and_grads(loss)
    value_c, grads_c = value_and_grads(torch.compile(loss, fullgraph=True))
    torch.testing.assert_close(value_c, value, rtol=1e-6, atol=1e-5)
    for name, g, g_c in zip(NAMES, grads, grads_c):
        torch.testing.assert_close(g_c, g, rtol=1e-6, atol=1e-5, msg=f"grad of {name}")


def test_custom_op_passes_opcheck():
    """The op torch.compile sees: its schema, fake implementation and autograd registration agree
    with what the kernel does."""
    inputs = make_inputs(2, CHUNK + 5, 2, 8, 1, 12, D="channel", seed=14)
    args = [inputs[name].detach().clone().requires_grad_() for name in NAMES]
    keep = (~document_starts(2, CHUNK + 5, seed=14)).float()
    torch.library.opcheck(ssd_cpu.ssd_cpu_fwd, (*args, keep))
