"""The fused selective-scan kernels of `kernels/`, built on first use, behind custom ops.

    y, last_state = scan_fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)

One op, `lethe::selective_scan_fwd` / `lethe::selective_scan_bwd`, registered with
torch.library (autograd formula and fake implementation included, so torch.compile, vmap and
make_fx trace through it without a graph break; plain eager calls take a shorter way to the same
kernels, _EagerScan), dispatching on the device to:

  cpu   kernels/selective_scan_cpu.cpp: threaded over (batch, channel), vectorized over d_state
  cuda  kernels/selective_scan_cuda.cu: one thread block per (batch, channel), a block-wide
        parallel scan over time (kernels/README.md has the design)

Each is compiled the first time it is needed (torch.utils.cpp_extension + ninja) for this
machine only (-march=native; the local GPU's architecture), into kernels/build/ under a name
that hashes the sources, flags and torch version, so a changed source rebuilds and an unchanged
one loads in a second. A failed build warns once and `auto` falls back to the PyTorch scan.
`make kernels` builds ahead of time and says what is ready.

Forward saves the state entering every chunk of `CHUNK[device]` steps (batch, channels,
n_chunks, d_state) and, with z on CUDA, the output before the gate; backward recomputes the
rest. Nothing of size batch x channels x length x d_state is kept.
"""

import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

KERNEL_DIR = Path(__file__).resolve().parents[3] / "kernels"
BUILD_DIR = Path(os.environ.get("LETHE_KERNEL_BUILD_DIR", KERNEL_DIR / "build"))
SOURCES = {
    "cpu": ["selective_scan_cpu.cpp"],
    "cuda": ["selective_scan_cuda_binding.cpp", "selective_scan_cuda.cu"],
    # the CUDA kernels' source run on CPU threads (kernels/cuda_emulation.h), float32 only: how
    # the tests check the CUDA algorithm on machines without a GPU
    "cuda_emulated": ["selective_scan_cuda_binding.cpp", "cuda_emulation.cpp"],
}
# Steps per saved chunk state. CUDA: 128 threads x 8 steps each (fixed in the kernel). CPU: the
# backward's working set per chunk (decays, states, B, C and the dB/dC partial rows: 6 x 64 x 16
# floats at d_state 16) stays in a 48 KB L1; 128-step chunks measured a ~20% slower backward.
CHUNK = {"cpu": 64, "cuda": 1024}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STALE_LOCK_S = 600  # a build lock older than this was left by a killed build

_status: dict[str, str | None] = {}  # device type -> None (loaded) or why the kernel is unavailable


def _native_flags() -> list[str]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return ["-march=native"]
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return []


def _cpu_fingerprint() -> str:
    """What -march=native compiles for: a build cache shared by different CPUs must not mix them."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return platform.processor()


def _build_options(device_type: str) -> dict:
    if device_type == "cpu":
        return dict(extra_cflags=["-O3", "-fopenmp", *_native_flags()], extra_ldflags=["-fopenmp"])
    if device_type == "cuda_emulated":
        return dict(extra_cflags=["-O1", "-DLETHE_CUDA_EMULATION", f"-I{KERNEL_DIR}"], with_cuda=False)
    arch = "".join(map(str, torch.cuda.get_device_capability()))
    return dict(
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
        with_cuda=True,
    )


def _library_name(device_type: str, options: dict) -> str:
    digest = hashlib.sha256()
    for path in [*(KERNEL_DIR / source for source in SOURCES[device_type]), *sorted(KERNEL_DIR.glob("*.h"))]:
        digest.update(path.read_bytes())
    extra = torch.version.cuda if device_type == "cuda" else _cpu_fingerprint()
    digest.update(f"{options}|{torch.__version__}|{sys.version_info[:2]}|{extra}".encode())
    return f"lethe_scan_{device_type}_{digest.hexdigest()[:12]}"


def _ensure_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the pip package's binary is not there unless the
    virtualenv is activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def _build(device_type: str) -> None:
    """Compile (or load the cached build of) one kernel library into torch.ops.lethe_<device>."""
    from torch.utils.cpp_extension import load

    _ensure_ninja_on_path()
    options = _build_options(device_type)
    if device_type == "cuda":  # cpp_extension would otherwise add every visible GPU's architecture
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ".".join(map(str, torch.cuda.get_device_capability())))
    name = _library_name(device_type, options)
    build_dir = BUILD_DIR / name
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)  # otherwise every later build would wait on it forever
    fresh = not any(build_dir.glob(f"{name}*.so"))
    if fresh:
        print(f"lethe: building the fused {device_type.upper()} selective-scan kernel (first use: seconds on CPU, about a minute for CUDA)...",
              file=sys.stderr, flush=True)
    sources = [str(KERNEL_DIR / source) for source in SOURCES[device_type]]
    load(name=name, sources=sources, build_directory=str(build_dir), is_python_module=False, verbose=False, **options)


def unavailable(device_type: str) -> str | None:
    """None when the fused kernel for `device_type` is loaded (building it on first call), else
    why it cannot run, in a few words. A failed build warns once, with the log's location."""
    if device_type in _status:
        return _status[device_type]
    if torch.compiler.is_compiling():  # a build cannot be traced; prepare() before compiling
        return "not built before torch.compile traced the model (call lethe.ops.scan_kernels.prepare() first)"
    reason = None
    if device_type not in SOURCES:
        reason = f"there is no fused kernel for {device_type} tensors"
    elif os.environ.get("LETHE_DISABLE_KERNELS"):
        reason = "disabled by LETHE_DISABLE_KERNELS"
    elif not (KERNEL_DIR / SOURCES[device_type][0]).is_file():
        reason = f"its sources are not in {KERNEL_DIR} (install Lethe from a clone: pip install -e .)"
    elif device_type == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device is available"
    else:
        try:
            _build(device_type)
        except Exception as exc:  # a compiler or toolchain problem: report it, never break the import
            log = BUILD_DIR / f"build-{device_type}.log"
            BUILD_DIR.mkdir(parents=True, exist_ok=True)
            log.write_text(str(exc))
            first = next((line.strip() for line in str(exc).splitlines() if "error" in line.lower()), str(exc).strip()[-200:])
            reason = f"its build failed ({first[:200]}); full log in {log}"
            warnings.warn(f"lethe: the fused {device_type} scan kernel is unavailable, using the PyTorch scan: {reason}",
                          stacklevel=2)
    _status[device_type] = reason
    return reason


def _kernel_ops(device_type: str):
    reason = unavailable(device_type)
    if reason is not None:
        raise RuntimeError(f"lethe: the fused {device_type} scan kernel is unavailable: {reason}")
    return getattr(torch.ops, f"lethe_{device_type}")


def _launch(op_name: str, u, args):
    """Run a kernel op for u's device; on CUDA under u's device guard, on its current stream."""
    op = getattr(_kernel_ops(u.device.type), op_name)
    if u.device.type == "cpu":
        return op(*args)
    with torch.cuda.device(u.device):
        return op(*args, torch.cuda.current_stream().cuda_stream)


def _n_chunks(u) -> int:
    return -(-u.shape[-1] // CHUNK[u.device.type])


def _scan_fwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None, delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns y, the last state, the chunk-entering states and (with z) y before the gate."""
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, CHUNK[u.device.type])
    return tuple(_launch("scan_fwd", u, args))


def _scan_bwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None, delta_softplus: bool, saved: torch.Tensor, y_pre: torch.Tensor,
    grad_y: torch.Tensor, grad_last: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of u, delta, A, B, C, D, z, delta_bias, initial_state (empty where the input is None)."""
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, CHUNK[u.device.type], saved)
    return tuple(_launch("scan_bwd", u, (*args, y_pre, grad_y, grad_last)))


# The custom ops torch.compile, vmap and make_fx trace (fake implementations below; no graph break).
selective_scan_fwd = torch.library.custom_op("lethe::selective_scan_fwd", _scan_fwd, mutates_args=())
selective_scan_bwd = torch.library.custom_op("lethe::selective_scan_bwd", _scan_bwd, mutates_args=())


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    batch, channels, _ = u.shape
    d_state = A.shape[1]
    y_pre = u.new_empty(u.shape) if z is not None else u.new_empty(0)
    return (u.new_empty(u.shape), u.new_empty(batch, channels, d_state, dtype=torch.float32),
            u.new_empty(batch, channels, _n_chunks(u), d_state, dtype=torch.float32), y_pre)


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, saved, y_pre, grad_y, grad_last):
    def like(t):
        return torch.empty_like(t) if t is not None else u.new_empty(0, dtype=torch.float32)
    grad_z = torch.empty_like(u) if z is not None else u.new_empty(0)
    return (torch.empty_like(u), torch.empty_like(u), torch.empty_like(A), torch.empty_like(B), torch.empty_like(C),
            like(D), grad_z, like(delta_bias), like(initial_state))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus = inputs
    _, _, saved, y_pre = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, saved, y_pre)
    ctx.delta_softplus = delta_softplus
    ctx.mark_non_differentiable(saved, y_pre)
    ctx.set_materialize_grads(False)  # an unused last state stays None instead of a tensor of zeros


def _gradients(scan_bwd, ctx, grad_y, grad_last):
    """The backward of the forward op, through `scan_bwd` (the custom op or its implementation)."""
    u, delta, A, B, C, D, z, delta_bias, initial_state, saved, y_pre = ctx.saved_tensors
    grad_y = torch.zeros_like(u) if grad_y is None else grad_y.contiguous()
    grad_last = None if grad_last is None else grad_last.contiguous()
    grads = scan_bwd(u, delta, A, B, C, D, z, delta_bias, initial_state, ctx.delta_softplus, saved, y_pre, grad_y, grad_last)
    optional_inputs = {5: D, 6: z, 7: delta_bias, 8: initial_state}
    grads = [None if optional_inputs.get(i, True) is None else g for i, g in enumerate(grads)]
    return (*grads, None)


selective_scan_fwd.register_autograd(lambda ctx, grad_y, grad_last, _grad_saved, _grad_y_pre:
                                     _gradients(selective_scan_bwd, ctx, grad_y, grad_last), setup_context=_setup_context)


class _EagerScan(torch.autograd.Function):
    """The same op and autograd in plain eager mode, calling the kernels directly: the custom op's
    Python dispatch costs ~70 us per forward+backward, and ~0.25 ms at batch 2 x 256 x 1024,
    where the kernel has just pushed the interpreter's data out of the caches (~8% of the call)."""

    @staticmethod
    def forward(ctx, *inputs):  # ctx first, not a separate setup_context: that binds the arguments with inspect, per call
        output = _scan_fwd(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernel's backward has no derivative: say so, not zeros
    def backward(ctx, grad_y, grad_last, _grad_saved, _grad_y_pre):
        return _gradients(_scan_bwd, ctx, grad_y, grad_last)


def _plain_eager() -> bool:
    """Outside torch.compile, functorch transforms (vmap) and dispatch-mode tracing (make_fx, fake
    tensors): those need the custom op, whose fake, batching and tracing rules torch knows."""
    return not (torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
                or _get_current_dispatch_mode() is not None)


def scan_fused(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, initial_state=None):
    """The whole selective scan (softplus, recurrence, C contraction, D skip, SiLU gate) in one
    kernel. u's dtype (float32, bfloat16 or float16) is the dtype of delta, B, C, z and y; A, D,
    delta_bias and the states are float32. Returns y and the last state (float32)."""
    dtype = u.dtype

    def like_u(t):
        return None if t is None else t.to(dtype).contiguous()

    def fp32(t):
        return None if t is None else t.float().contiguous()

    scan = _EagerScan.apply if _plain_eager() else selective_scan_fwd
    y, last, _, _ = scan(u.contiguous(), like_u(delta), fp32(A), like_u(B), like_u(C), fp32(D), like_u(z),
                         fp32(delta_bias), fp32(initial_state), bool(delta_softplus))
    return y, last


def prepare() -> dict[str, str | None]:
    """Build or load the kernels for every device this machine has; returns `unavailable` of each.
    torch.compile needs this done before it traces (MambaLM.compile calls it)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {device_type: unavailable(device_type) for device_type in devices}


def main() -> None:
    """Build (or load) every kernel this machine can run and say which are ready."""
    start = time.perf_counter()
    status = prepare()
    for device_type, reason in status.items():
        print(f"{device_type}: " + ("ready" if reason is None else f"unavailable: {reason}"))
    print(f"({time.perf_counter() - start:.1f} s)")
    if "cuda" not in status:
        print("cuda: no CUDA device here (the CUDA sources are compile-checked by the test suite when nvcc is present)")
    sys.exit(0 if all(reason is None for reason in status.values()) else 1)

