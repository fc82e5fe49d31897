"""The fused kernels of kernels/: what test_scan.py (every impl against the reference) does not
cover. The CUDA kernels' algorithm runs here without a GPU through their CPU-thread emulation
(kernels/cuda_emulation.h); the real CUDA build and runs are the `gpu` tests."""

import importlib
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from helpers import ROOT, make_inputs, run
from lethe.errors import ConfigError
from lethe.ops import (
    causal_conv1d,
    causal_conv1d_reference,
    kernel_build,
    resolve_scan_impl,
    scan_kernels,
    selective_scan,
    selective_scan_ref,
)

conv_module = importlib.import_module("lethe.ops.causal_conv1d")  # the module: lethe.ops re-exports its function

KERNELS = ROOT / "kernels"
OPTIONAL = ("D", "z", "delta_bias", "initial_state")
NAMES = ("u", "delta", "A", "B", "C", *OPTIONAL)


def reference_with_grads(inputs, grad_y, grad_last, document_starts=None):
    args = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y, last = selective_scan_ref(**args, document_starts=document_starts)  # the ground truth itself, not through the dispatcher under test
    torch.autograd.backward([y, last], [grad_y, grad_last])
    return y, last, {k: v.grad for k, v in args.items()}


def emulated_cuda(inputs, grad_y, grad_last, document_starts=None):
    """The CUDA kernels' forward and backward, run on CPU threads."""
    assert kernel_build.unavailable("cuda_emulated") is None
    ops = torch.ops.lethe_cuda_emulated
    args = [inputs.get(name) for name in NAMES] + [None if document_starts is None else (~document_starts).float().contiguous()]
    y, last, saved, y_pre = ops.scan_fwd(*args, True, scan_kernels.CHUNK["cuda"], 0)
    grads = ops.scan_bwd(*args, True, scan_kernels.CHUNK["cuda"], saved, y_pre, grad_y, grad_last, 0)
    return y, last, saved, dict(zip(NAMES, grads))


@pytest.mark.parametrize("shape,options", [
    ((1, 2, 1, 1), OPTIONAL),
    ((2, 3, 7, 4), ("D",)),
    ((1, 2, 1025, 16), OPTIONAL),  # two chunks of 1024: the carry across chunks, both ways
    ((1, 1, 1100, 64), ("z", "initial_state")),
    ((2, 3, 300, 5), ()),
    ((2, 2, 1100, 8), (*OPTIONAL, "document_starts")),  # documents starting at 0, at a chunk boundary and at the last step
], ids=["len1", "odd", "past-chunk", "d_state64", "bare", "documents"])
def test_cuda_kernel_algorithm_matches_reference(shape, options):
    inputs = {k: v for k, v in make_inputs(*shape, seed=sum(shape)).items() if k in ("u", "delta", "A", "B", "C", *options)}
    document_starts = None
    if "document_starts" in options:
        document_starts = torch.zeros(shape[0], shape[2], dtype=torch.bool)
        document_starts[0, [0, 1, 500, 1023, 1024, shape[2] - 1]] = True
        document_starts[1, [77]] = True
    g = torch.Generator().manual_seed(5)
    grad_y = torch.randn(shape[0], shape[1], shape[2], generator=g)
    grad_last = torch.randn(shape[0], shape[1], shape[3], generator=g)
    y_ref, last_ref, grads_ref = reference_with_grads(inputs, grad_y, grad_last, document_starts)
    y, last, saved, grads = emulated_cuda(inputs, grad_y, grad_last, document_starts)
    assert saved.shape == (shape[0], shape[1], -(-shape[2] // 1024), shape[3])
    torch.testing.assert_close(y, y_ref, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, last_ref, rtol=6e-4, atol=2e-3)
    for name in inputs:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=6e-4, atol=2e-3, msg=f"grad of {name}")
    for name in set(OPTIONAL) - set(options):
        assert grads[name].numel() == 0


def test_cuda_kernel_algorithm_is_deterministic():
    inputs = make_inputs(2, 3, 1030, 4, seed=8)
    grad_y, grad_last = torch.randn(2, 3, 1030), torch.randn(2, 3, 4)
    _, _, _, first = emulated_cuda(inputs, grad_y, grad_last)
    _, _, _, second = emulated_cuda(inputs, grad_y, grad_last)
    assert all(torch.equal(first[name], second[name]) for name in NAMES)


# Channel groups of the backward's dB/dC partial sums: 3 groups of 16 channels; 5 of 64, the last part-filled.
@pytest.mark.parametrize("channels", [40, 300])
def test_cpu_kernel_gradients_are_bit_identical_across_runs_and_thread_counts(channels):
    inputs = make_inputs(2, channels, 300, 16, seed=4)
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (threads, threads, 1):
            torch.set_num_threads(n_threads)
            results.append(run("cpu", inputs, True, True, True))
    finally:
        torch.set_num_threads(threads)
    for y, last, grads in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(last, results[0][1])
        assert all(torch.equal(grads[k], results[0][2][k]) for k in grads)
    _, _, grads_ref = run("reference", inputs, True, True, True)
    for name in ("B", "C"):  # the sums over channel groups
        torch.testing.assert_close(results[0][2][name], grads_ref[name], rtol=6e-4, atol=2e-3)


def test_custom_ops_pass_torch_library_opcheck():
    inputs = make_inputs(2, 3, 140, 5, seed=6)
    args = [inputs[name].clone().requires_grad_(name in ("u", "delta", "B", "A")) for name in NAMES]
    keep = torch.ones(2, 140)
    keep[0, [0, 64, 100]] = 0  # documents starting inside the rows
    torch.library.opcheck(scan_kernels.selective_scan_fwd, (*args, None, True))
    torch.library.opcheck(scan_kernels.selective_scan_fwd, (*args, keep, True))


def test_torch_compile_traces_the_scan_without_graph_breaks():
    inputs = make_inputs(1, 4, 50, 8, seed=3)

    def step(u, delta, A, B, C, D, z, delta_bias, initial_state):
        y, last = selective_scan(u, delta, A, B, C, D, z, delta_bias, True, initial_state, impl="cpu")
        return (y * y).sum() + last.sum()

    def grads(fn):
        args = [inputs[name].clone().requires_grad_() for name in NAMES]
        loss = fn(*args)
        loss.backward()
        return loss, [a.grad for a in args]

    traced = []

    def aot_eager_recording(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes)
        return lookup_backend("aot_eager")(graph_module, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=aot_eager_recording, fullgraph=True)  # fullgraph: a break is an error
    loss, compiled_grads = grads(compiled)
    # compile traces the custom op (eager calls skip its Python dispatch), and eager agrees with it
    assert "lethe.selective_scan_fwd.default" in traced
    expected_loss, expected_grads = grads(step)
    torch.testing.assert_close(loss, expected_loss)
    for got, expected in zip(compiled_grads, expected_grads):
        torch.testing.assert_close(got, expected)


def test_compiled_mamba_model_is_one_graph_and_matches_eager(monkeypatch):
    from lethe.models import MambaLM

    monkeypatch.setattr(kernel_build, "_status", {})  # as in a fresh process: nothing built or loaded yet

    torch.manual_seed(0)
    model = MambaLM(vocab_size=64, d_model=32, n_layer=2, d_state=8)
    ids = torch.randint(0, 64, (2, 40))
    expected = model(ids)
    expected.logsumexp(-1).sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    model.compile(backend="aot_eager", fullgraph=True)
    logits = model(ids)  # tracing asks for the kernel, which is built (here: loaded) then, outside the graph
    assert kernel_build._status == {"cpu": None, "conv_cpu": None}  # the scan's and the short convolution's
    logits.logsumexp(-1).sum().backward()
    torch.testing.assert_close(logits, expected)
    for p, grad in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, grad)


def test_auto_picks_the_kernel_for_its_device_and_dtype():
    assert resolve_scan_impl("auto", torch.device("cpu"), 100, torch.float32) == "cpu"
    assert resolve_scan_impl("auto", torch.device("cpu"), 100, torch.bfloat16) == "cpu"
    assert resolve_scan_impl("auto", torch.device("cpu"), 100, torch.float64) == "chunked"


@pytest.mark.parametrize("impl,device,dtype,message", [
    ("cuda", "cpu", torch.float32, "runs on cuda tensors, these are on cpu"),
    ("cpu", "cpu", torch.float64, "takes float32, bfloat16 or float16 inputs"),
])
def test_impl_that_cannot_run_is_a_one_line_error(impl, device, dtype, message):
    with pytest.raises(ConfigError, match=message) as error:
        resolve_scan_impl(impl, torch.device(device), 10, dtype)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("library", ["lethe_cpu", "lethe_cuda_emulated"])
def test_kernels_refuse_mismatched_inputs_naming_the_argument(library):
    assert kernel_build.unavailable(library.removeprefix("lethe_")) is None
    inputs = make_inputs(1, 2, 9, 3)
    args = [inputs[name] for name in ("u", "delta", "A")] + [inputs["B"][:, :, :8].contiguous(), inputs["C"], None, None, None, None,
                                                            None, True]
    extra = (1024, 0) if library == "lethe_cuda_emulated" else (scan_kernels.CHUNK["cpu"],)
    with pytest.raises(RuntimeError, match=r"kernel\): B and C must be \(batch, d_state, length\)"):
        getattr(torch.ops, library).scan_fwd(*args, *extra)


@pytest.fixture
def fresh_status(monkeypatch, tmp_path):
    """Kernel status and build directory of a clean machine, restored afterwards."""
    monkeypatch.setattr(kernel_build, "_status", {})
    monkeypatch.setattr(kernel_build, "BUILD_DIR", tmp_path / "build")
    return tmp_path


def test_failed_build_warns_once_and_auto_falls_back(fresh_status, monkeypatch):
    sources = fresh_status / "kernels"
    sources.mkdir()
    (sources / "selective_scan_cpu.cpp").write_text("this is not C++;\n")
    monkeypatch.setattr(kernel_build, "KERNEL_DIR", sources)
    with pytest.warns(UserWarning, match="fused cpu scan kernel is unavailable") as caught:
        assert resolve_scan_impl("auto", torch.device("cpu"), 100) == "chunked"
    assert len(caught) == 1 and "build failed" in str(caught[0].message)
    assert (fresh_status / "build" / "build-cpu.log").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: the second time is silent
        assert resolve_scan_impl("auto", torch.device("cpu"), 100) == "chunked"
    with pytest.raises(ConfigError, match=r"scan_impl='cpu' cannot run: its build failed"):
        resolve_scan_impl("cpu", torch.device("cpu"), 100)
    y, _ = selective_scan(**make_inputs(1, 2, 9, 3))  # auto still computes, with the PyTorch scan
    assert torch.isfinite(y).all()


def test_disabled_kernels_fall_back(fresh_status, monkeypatch):
    monkeypatch.setenv("LETHE_DISABLE_KERNELS", "1")
    assert kernel_build.unavailable("cpu") == "disabled by LETHE_DISABLE_KERNELS"
    assert resolve_scan_impl("auto", torch.device("cpu"), 100) == "chunked"


def test_build_is_keyed_by_the_sources(monkeypatch, tmp_path):
    """A changed source gets a new library name (a rebuild); the same source reuses the build."""
    copy = tmp_path / "kernels"
    shutil.copytree(KERNELS, copy, ignore=shutil.ignore_patterns("build"))
    monkeypatch.setattr(kernel_build, "KERNEL_DIR", copy)
    options = kernel_build._build_options("cpu")
    before = kernel_build._library_name("cpu", options)
    assert kernel_build._library_name("cpu", options) == before
    with open(copy / "selective_scan_cpu.cpp", "a") as source:
        source.write("\n// an edit\n")
    assert kernel_build._library_name("cpu", options) != before


def test_cpu_outputs_reuse_freed_memory_and_never_alias_live_ones():
    """Outputs come from a pool of blocks kept mapped (kernels/output_pool.h): a freed output's
    block serves the next call of the same shape, never one that is still alive."""
    # without z the forward's only (batch, channels, length) output is y
    first = {k: v for k, v in make_inputs(2, 8, 300, 16, seed=1).items() if k != "z"}
    second = {k: v for k, v in make_inputs(2, 8, 300, 16, seed=2).items() if k != "z"}
    y1, _ = selective_scan(**first, impl="cpu")
    kept = y1.clone()
    y2, _ = selective_scan(**second, impl="cpu")
    assert y2.data_ptr() != y1.data_ptr() and torch.equal(y1, kept)
    block = y1.data_ptr()
    del y1
    y3, _ = selective_scan(**first, impl="cpu")
    assert y3.data_ptr() == block and torch.equal(y3, kept)
    y_ref, _ = selective_scan(**second, impl="reference")
    torch.testing.assert_close(y2, y_ref, rtol=6e-4, atol=2e-3)


def test_cpu_kernel_takes_an_empty_batch():
    """Batch 0: empty outputs and zero parameter gradients, as from the reference (the batch
    sums of dA, dD and d delta_bias once divided by the batch size)."""
    expected, got = (run(impl, make_inputs(0, 3, 20, 5, seed=4), True, True, True) for impl in ("reference", "cpu"))
    for a, b in [(expected[0], got[0]), (expected[1], got[1]), *((expected[2][k], got[2][k]) for k in expected[2])]:
        assert a.shape == b.shape
        torch.testing.assert_close(b, a)


def test_cpu_kernel_keeps_a_non_finite_row_to_itself():
    """An inf in one (batch, channel) row makes that row non-finite, never the rows after it, also
    with an initial state and a d_state that leaves padding lanes in the kernel's vectors."""
    inputs = {k: v for k, v in make_inputs(1, 8, 40, 5, seed=6).items() if k != "z"}
    inputs["u"][0, 0, 10] = float("inf")  # the first row of the first unit of rows a thread runs
    y, last = selective_scan(**inputs, impl="cpu")
    y_ref, last_ref = selective_scan(**inputs, impl="reference")
    assert not torch.isfinite(y[0, 0]).all()
    clean = list(range(1, 8))
    assert torch.isfinite(y[0, clean]).all() and torch.isfinite(last[0, clean]).all()
    torch.testing.assert_close(y[0, clean], y_ref[0, clean], rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last[0, clean], last_ref[0, clean], rtol=6e-4, atol=2e-3)


def _has_avx512() -> bool:
    return " avx512f " in f" {kernel_build._cpu_fingerprint()} "


# Run in a fresh interpreter: a second library defining the lethe_cpu ops cannot load beside the first.
PORTABLE_BUILD_CHECK = """
import sys, torch
from lethe.ops import kernel_build
from helpers import make_inputs, run
kernel_build._native_flags = lambda: ["-march=native", "-mno-avx512f"]
kernel_build.BUILD_DIR = kernel_build.Path(sys.argv[1])
assert kernel_build.unavailable("cpu") is None, kernel_build.unavailable("cpu")
for shape in [(2, 3, 1, 4), (1, 4, 129, 5), (2, 3, 300, 16), (1, 2, 70, 40)]:
    inputs = make_inputs(*shape, seed=sum(shape))
    expected, got = run("reference", inputs, True, True, True), run("cpu", inputs, True, True, True)
    for name, a, b in [("y", expected[0], got[0]), ("last", expected[1], got[1]),
                       *((f"d{k}", expected[2][k], got[2][k]) for k in expected[2])]:
        torch.testing.assert_close(b, a, rtol=6e-4, atol=2e-3, msg=lambda m: f"{shape} {name}: {m}")
print("ok")
"""


@pytest.mark.skipif(not _has_avx512(), reason="the default build here already is the portable one")
def test_cpu_kernel_without_avx512_matches_reference(tmp_path):
    """On AVX-512 machines the kernel uses 16-float vectors and a table-driven exp; the 8-float
    path with the series exp (AVX2 x86, ARM) must stay right too, so build it here as well."""
    result = subprocess.run([sys.executable, "-c", PORTABLE_BUILD_CHECK, str(tmp_path / "build")], cwd=ROOT / "tests",
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:] + result.stderr[-3000:]


# ---- compile checks: a syntax or template error fails CI, which has nvcc but no GPU -------------

def torch_includes():
    from torch.utils.cpp_extension import include_paths
    return [f"-I{path}" for path in include_paths()]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_kernels_compile_for_sm80_and_sm90(tmp_path):
    command = ["nvcc", "-std=c++17", "-O3", "--use_fast_math", "-c", str(KERNELS / "selective_scan_cuda.cu"),
               "-o", str(tmp_path / "scan.o"), "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_cuda_binding_compiles_against_torch():
    cxx = shutil.which("c++") or shutil.which("g++")
    command = [cxx, "-std=c++20", "-fsyntax-only", *torch_includes(), f"-I{sys.prefix}",
               str(KERNELS / "selective_scan_cuda_binding.cpp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


# ---- causal-conv1d: the optional package on CUDA, F.conv1d elsewhere ---------------------------

class FakeCausalConv1d:
    """Stands in for the causal-conv1d package with its documented semantics (update shifts the
    state in place), to check the routing and state handling without a GPU."""

    def __init__(self):
        self.calls = []

    def causal_conv1d_fn(self, x, weight, bias=None, activation=None):
        self.calls.append("fn")
        return causal_conv1d_reference(x, weight, bias, activation)

    def causal_conv1d_update(self, x, conv_state, weight, bias=None, activation=None):
        self.calls.append("update")
        window = torch.cat([conv_state, x[:, :, None]], dim=-1)
        conv_state.copy_(window[:, :, 1:])
        out = (window * weight).sum(-1) + (0 if bias is None else bias)
        return torch.nn.functional.silu(out) if activation == "silu" else out


def test_short_convolution_routes_to_the_package_on_cuda(monkeypatch):
    fake = FakeCausalConv1d()
    monkeypatch.setattr(conv_module, "_package_for", lambda x, width, activation: fake)
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 5, 9, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    torch.testing.assert_close(causal_conv1d(x, w, b, "silu"), causal_conv1d_reference(x, w, b, "silu"))
    state = torch.randn(2, 5, 3, generator=g)
    step = torch.randn(2, 5, 1, generator=g)
    out, new_state = causal_conv1d(step, w, b, "silu", initial_states=state, return_final_states=True)
    torch.testing.assert_close(out, causal_conv1d_reference(step, w, b, "silu", initial_states=state))
    torch.testing.assert_close(new_state, torch.cat([state, step], -1)[:, :, 1:])
    assert fake.calls == ["fn", "update"]
    assert not torch.equal(state, new_state)  # the caller's state is not shifted in place


def test_broken_causal_conv1d_install_is_reported_once(monkeypatch, tmp_path):
    package = tmp_path / "causal_conv1d"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(conv_module, "_package", None)
    with pytest.warns(UserWarning, match="causal-conv1d is installed but does not import") as caught:
        assert conv_module.cuda_package() is None
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert conv_module.cuda_package() is None


# ---- on a GPU (`make test-gpu`) ------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_kernel_backward_is_deterministic_on_gpu():
    inputs = make_inputs(2, 64, 3000, 16, seed=12)
    first, second = run("cuda", inputs, True, True, True), run("cuda", inputs, True, True, True)
    assert all(torch.equal(first[2][k], second[2][k]) for k in first[2])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_package_matches_reference_on_gpu(dtype):
    if conv_module.cuda_package() is None:
        pytest.skip("causal-conv1d is not installed (pip install -e .[cuda])")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 300, generator=g).cuda().to(dtype)
    w, b = torch.randn(64, 4, generator=g).cuda(), torch.randn(64, generator=g).cuda()
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(causal_conv1d(x, w, b, "silu").float(), causal_conv1d_reference(x.float(), w, b, "silu"), **tolerance)
    state, step = x[:, :, :3], x[:, :, 3:4]
    out, new_state = causal_conv1d(step, w, b, "silu", initial_states=state, return_final_states=True)
    torch.testing.assert_close(out.float(), causal_conv1d_reference(step.float(), w, b, "silu", initial_states=state.float()), **tolerance)
    torch.testing.assert_close(new_state, x[:, :, 1:4])
