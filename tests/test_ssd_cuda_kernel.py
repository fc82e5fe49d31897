"""The fused CUDA SSD kernel (kernels/ssd_cuda.cu) through its Python face, lethe.ops.ssd_cuda.
Without a GPU its algorithm runs here on CPU threads (the CUDA source compiled as C++,
kernels/cuda_emulation.h), through the same binding, custom op and autograd as on a GPU, against
the sequential reference in float64; nvcc compiles the CUDA source when it is installed; the
`gpu` tests run the real build."""

import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.registry import lookup_backend

from helpers import ROOT
from lethe.ops import kernel_build, ssd_cuda, ssd_scan_ref

KERNELS = ROOT / "kernels"
TOLERANCE = dict(rtol=6e-4, atol=2e-3)  # the Mamba-1 kernels' (tests/test_kernels.py)
IN_X_DTYPE = ("x", "B", "C")  # the kernel's inputs in x's dtype; the others are float32


def make_inputs(batch, length, nheads, headdim, ngroups, d_state, seed=0, D="head", initial=True, device="cpu"):
    """Model-like inputs: dt prepared (softplus of a normal around -2), A in [-8, -0.5]."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    inputs = {"x": randn(batch, length, nheads, headdim), "dt": F.softplus(randn(batch, length, nheads) - 2),
              "A": -(torch.rand(nheads, generator=g) * 7.5 + 0.5), "B": randn(batch, length, ngroups, d_state),
              "C": randn(batch, length, ngroups, d_state),
              "D": {"head": randn(nheads), "row": randn(nheads, headdim), None: None}[D],
              "initial_state": randn(batch, nheads, headdim, d_state) if initial else None}
    return {k: None if v is None else v.to(device) for k, v in inputs.items()}


def with_grads(fn, inputs, document_starts, grad_y, grad_last, dtype=None):
    """fn's outputs and the gradients of every input given (None: that output unused); dtype: of
    x, B and C."""
    args = {k: None if v is None else (v.to(dtype) if dtype and k in IN_X_DTYPE else v).detach().clone().requires_grad_()
            for k, v in inputs.items()}
    y, last = fn(**args, document_starts=document_starts)
    used = [(out, grad.to(out.dtype)) for out, grad in ((y, grad_y), (last, grad_last)) if grad is not None]
    torch.autograd.backward([out for out, _ in used], [grad for _, grad in used])
    return y, last, {k: v.grad for k, v in args.items() if v is not None}


def reference(x, dt, A, B, C, D=None, initial_state=None, document_starts=None):
    return ssd_scan_ref(x, dt, A, B, C, D, dt_softplus=False, initial_state=initial_state, document_starts=document_starts)


def assert_matches_reference(inputs, document_starts=None, grad_y=True, grad_last=True, seed=5):
    x = inputs["x"]
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(x.shape, generator=g) if grad_y else None
    gl = torch.randn(*x.shape[:1], *x.shape[2:], inputs["B"].shape[-1], generator=g) if grad_last else None
    y, last, grads = with_grads(ssd_cuda.ssd_fused_cuda, inputs, document_starts, gy, gl)
    as64 = {k: None if v is None else v.double() for k, v in inputs.items()}
    y_ref, last_ref, grads_ref = with_grads(reference, as64, document_starts, None if gy is None else gy.double(),
                                            None if gl is None else gl.double())
    torch.testing.assert_close(y, y_ref.float(), **TOLERANCE)
    torch.testing.assert_close(last, last_ref.float(), **TOLERANCE)
    assert grads.keys() == grads_ref.keys()
    for name in grads:  # None from the reference: no path from that input to the outputs used
        expected = torch.zeros_like(grads[name]) if grads_ref[name] is None else grads_ref[name].float()
        torch.testing.assert_close(grads[name], expected, **TOLERANCE, msg=lambda m: f"grad of {name}: {m}")


@pytest.fixture(scope="session")
def emulated_library():
    """Built once (minutes on 2 cores the first time, then cached in kernels/build/)."""
    reason = kernel_build.unavailable("ssd_cuda_emulated")
    assert reason is None, reason


@pytest.fixture
def emulated(emulated_library, monkeypatch):
    monkeypatch.setattr(ssd_cuda, "EMULATE_ON_CPU", True)


# (batch, length, nheads, headdim, ngroups, d_state); the forward stages 8 steps at a time, the
# backward 4, a state is saved every 256 steps; the layout cuts a head into tiles of rows.
@pytest.mark.parametrize("shape,options", [
    ((2, 1, 2, 3, 1, 5), {}),
    ((2, 13, 4, 7, 2, 3), {"D": "row"}),
    ((1, 9, 3, 16, 3, 32), {"initial": False}),  # past one chunk of each pass; a group per head
    ((1, 261, 2, 8, 1, 16), {"D": "row"}),  # past a segment: the saved state and the adjoint carried across it
    ((1, 20, 2, 128, 1, 1), {}),  # headdim 128, d_state 1
    ((1, 12, 2, 72, 1, 130), {"D": "row"}),  # tiles of 16 rows, the last of 8; d_state past a power of two
    ((1, 10, 2, 5, 1, 256), {}),  # 32 threads per state row
    ((2, 15, 6, 2, 2, 16), {}),  # 2 heads per backward block: 2 blocks per group, the last with one head
    ((2, 6, 8, 2, 2, 64), {"D": None, "initial": False}),  # a group's 4 heads in one backward block
], ids=["len1", "odd", "past-chunk", "past-segment", "headdim128", "tiles", "d_state256", "heads-per-block", "bare"])
def test_emulated_kernel_matches_reference(emulated, shape, options):
    assert_matches_reference(make_inputs(*shape, seed=sum(shape), **options))


def test_emulated_kernel_resets_at_document_starts(emulated):
    inputs = make_inputs(2, 262, 2, 6, 2, 24, seed=3, D="row")
    document_starts = torch.zeros(2, 262, dtype=torch.bool)
    document_starts[0, [0, 1, 4, 255, 256, 261]] = True  # the first and last steps, inside a chunk, a segment boundary
    document_starts[1, 77] = True
    assert_matches_reference(inputs, document_starts)


@pytest.mark.parametrize("used", ["y", "last"])
def test_emulated_kernel_with_one_output_used(emulated, used):
    assert_matches_reference(make_inputs(1, 11, 2, 4, 1, 8, seed=4), grad_y=used == "y", grad_last=used == "last")


def test_emulated_kernel_gradients_are_bit_identical_across_runs(emulated):
    inputs = make_inputs(2, 40, 6, 8, 2, 16, seed=7, D="row")  # 2 heads per backward block, dB/dC summed over blocks
    document_starts = torch.zeros(2, 40, dtype=torch.bool)
    document_starts[1, 17] = True
    gy, gl = torch.randn(2, 40, 6, 8), torch.randn(2, 6, 8, 16)
    first, second = (with_grads(ssd_cuda.ssd_fused_cuda, inputs, document_starts, gy, gl) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(first[2][k], second[2][k]) for k in first[2])


def test_emulated_custom_op_passes_opcheck_and_compiles_without_graph_breaks(emulated):
    inputs = make_inputs(1, 5, 2, 3, 1, 4, seed=2, D="row")
    keep = torch.ones(1, 5)
    keep[0, 2] = 0
    args = [inputs[k].clone().requires_grad_(k in ("x", "dt", "B")) for k in ("x", "dt", "A", "B", "C", "D", "initial_state")]
    torch.library.opcheck(ssd_cuda.ssd_cuda_fwd, (*args, keep))

    def loss(x, dt, A, B, C, D, initial_state):
        y, last = ssd_cuda.ssd_fused_cuda(x, dt, A, B, C, D, initial_state)
        return (y * y).sum() + last.sum()

    def grads(fn):
        leaves = [inputs[k].clone().requires_grad_() for k in ("x", "dt", "A", "B", "C", "D", "initial_state")]
        value = fn(*leaves)
        value.backward()
        return value, [leaf.grad for leaf in leaves]

    traced = []

    def aot_eager_recording(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes)
        return lookup_backend("aot_eager")(graph_module, example_inputs)

    torch._dynamo.reset()
    compiled_value, compiled_grads = grads(torch.compile(loss, backend=aot_eager_recording, fullgraph=True))
    assert "lethe.ssd_cuda_fwd.default" in traced  # eager calls skip the custom op; compiled ones trace it
    value, eager_grads = grads(loss)
    torch.testing.assert_close(compiled_value, value)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected)


def test_emulated_kernel_refuses_mismatched_inputs_naming_the_argument(emulated):
    inputs = make_inputs(1, 6, 2, 3, 1, 4)
    with pytest.raises(RuntimeError, match=r"cuda kernel\): B and C must be contiguous \(batch, length, ngroups, d_state\)"):
        ssd_cuda.ssd_fused_cuda(inputs["x"], inputs["dt"], inputs["A"], inputs["B"][:, :5], inputs["C"])
    with pytest.raises(RuntimeError, match=r"d_state must be in 1..256"):
        ssd_cuda.ssd_fused_cuda(inputs["x"], inputs["dt"], inputs["A"], torch.randn(1, 6, 1, 257), torch.randn(1, 6, 1, 257))


def test_cpu_tensors_need_the_emulation_switch():
    inputs = make_inputs(1, 3, 1, 2, 1, 2)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors, these are on cpu"):
        ssd_cuda.ssd_fused_cuda(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"])


# ---- compile checks: a syntax or template error fails CI, which has nvcc but no GPU -------------

@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_ssd_cuda_kernel_compiles_for_sm80_and_sm90(tmp_path):
    command = ["nvcc", "-std=c++17", "-O3", "--use_fast_math", "-c", str(KERNELS / "ssd_cuda.cu"), "-o", str(tmp_path / "ssd.o"),
               "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_ssd_cuda_binding_compiles_against_torch():
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("c++") or shutil.which("g++")
    command = [cxx, "-std=c++20", "-fsyntax-only", *(f"-I{path}" for path in include_paths()), f"-I{sys.prefix}",
               str(KERNELS / "ssd_cuda_binding.cpp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


# ---- on a GPU (`make test-gpu`) ------------------------------------------------------------------

def gpu_inputs(seed=0):
    """The model's defaults (headdim 64, d_state 128), two groups, past two saved segments."""
    return make_inputs(2, 600, 4, 64, 2, 128, seed=seed, D="row", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 6e-4, 2e-3), (torch.bfloat16, 3e-2, 5e-2)])
def test_ssd_cuda_kernel_matches_reference_on_gpu(dtype, rtol, atol):
    """Against the reference on the same inputs (bfloat16 ones rounded as the kernel reads them)."""
    inputs = {k: v.to(dtype).float() if k in IN_X_DTYPE else v for k, v in gpu_inputs().items()}
    document_starts = torch.zeros(2, 600, dtype=torch.bool, device="cuda")
    document_starts[0, [0, 255, 256, 599]] = True
    document_starts[1, 300] = True
    gy, gl = torch.randn(2, 600, 4, 64, device="cuda"), torch.randn(2, 4, 64, 128, device="cuda")
    y, last, grads = with_grads(ssd_cuda.ssd_fused_cuda, inputs, document_starts, gy.to(dtype), gl, dtype=dtype)
    y_ref, last_ref, grads_ref = with_grads(reference, inputs, document_starts, gy.to(dtype).float(), gl)
    assert y.dtype == dtype and last.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(last, last_ref, rtol=rtol, atol=atol)
    for name in grads:
        torch.testing.assert_close(grads[name].float(), grads_ref[name], rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.gpu
def test_ssd_cuda_kernel_is_deterministic_on_gpu():
    inputs = gpu_inputs(seed=1)
    gy, gl = torch.randn(2, 600, 4, 64, device="cuda"), torch.randn(2, 4, 64, 128, device="cuda")
    first, second = (with_grads(ssd_cuda.ssd_fused_cuda, inputs, None, gy, gl) for _ in range(2))
    assert torch.equal(first[0], second[0]) and all(torch.equal(first[2][k], second[2][k]) for k in first[2])


@pytest.mark.gpu
def test_ssd_cuda_kernel_packed_documents_match_separate_calls_on_gpu():
    """Two documents packed in one row, reset at the second's start, are the two run apart."""
    inputs = {k: v[:1] if k in ("x", "dt", "B", "C", "initial_state") else v for k, v in gpu_inputs(seed=2).items()}
    document_starts = torch.zeros(1, 600, dtype=torch.bool, device="cuda")
    document_starts[0, 333] = True
    packed, _ = ssd_cuda.ssd_fused_cuda(**inputs, document_starts=document_starts)
    second = {k: v[:, 333:] if k in ("x", "dt", "B", "C") else v for k, v in inputs.items() if k != "initial_state"}
    alone, _ = ssd_cuda.ssd_fused_cuda(**second)
    torch.testing.assert_close(packed[:, 333:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_ssd_cuda_kernel_keeps_no_per_step_state_on_gpu():
    """Forward and backward over 8192 steps stay far below one state per step (2 GiB here): the
    forward keeps a state per 256 steps, the backward recomputes the rest."""
    inputs = make_inputs(1, 8192, 8, 64, 1, 128, seed=3, device="cuda")
    gy = torch.randn(1, 8192, 8, 64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with_grads(ssd_cuda.ssd_fused_cuda, inputs, None, gy, None)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 256 * 2**20
