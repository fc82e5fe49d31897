"""The selective scan behind one function, with interchangeable implementations.

    y, last_state = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                   initial_state, impl="auto", document_starts=None)

Shapes follow the official kernel: u, delta, z (batch, channels, length); A (channels, d_state);
B, C (batch, d_state, length); D, delta_bias (channels,); states (batch, channels, d_state);
document_starts (batch, length) bool, where packed documents begin (every impl resets there).
Inputs may be float32, bfloat16 or float16: all math and the state are float32 (float64 stays
float64, for gradcheck). y comes back in u's dtype, the state in float32 (or float64).

Implementations:
  reference  selective_scan_ref: the whole op as one sequential loop, the ground truth
             (ops/scan_reference.py)
  chunked    chunked parallel PyTorch with a hand-written backward (ops/scan_chunked.py)
  cpu, cuda  the fused kernels of kernels/ (ops/scan_kernels.py), built on first use: softplus,
             recurrence, C contraction, D skip and gate in one pass, state kept on chip
  auto       the fused kernel for the inputs' device when it builds (float32/bfloat16/float16),
             else chunked; a single step (recurrent decoding) is the reference's few ops
"""

import torch
import torch.nn.functional as F

from lethe.errors import ConfigError
from lethe.ops import kernel_build, scan_kernels
from lethe.ops.kernel_ops import KERNEL_DTYPES
from lethe.ops.scan_chunked import scan_chunked
from lethe.ops.scan_reference import selective_scan_ref

FUSED_IMPLS = ("cpu", "cuda")
LIBRARIES = {"cpu": "cpu", "cuda": "cuda"}  # FUSED_IMPLS's kernels in kernel_build
SCAN_IMPL_CHOICES = ("auto", "reference", "chunked", *FUSED_IMPLS)
# torch.compile runs this at trace time and keeps its answer as a constant: the first traced call
# builds the kernel (outside the graph), so nothing has to prepare the kernels before compiling.
kernel_unavailable = torch.compiler.assume_constant_result(kernel_build.unavailable)


def resolve_impl(impl: str, device: torch.device, length: int | None, dtype, libraries: dict[str, str]) -> str:
    """Map `auto` to a concrete implementation; say in one line why a named one cannot run.
    libraries: the kernel library (kernel_build.SOURCES) of each fused impl, by device type; the
    other impls are reference and chunked. One rule for this scan and Mamba-2's (ops/ssd.py)."""
    device_type = torch.device(device).type
    if impl == "auto":
        if length == 1:  # one decoding step is the recurrence itself: a few ops, the least overhead
            return "reference"
        if dtype in KERNEL_DTYPES and device_type in libraries and kernel_unavailable(libraries[device_type]) is None:
            return device_type
        return "chunked"
    choices = ("auto", "reference", "chunked", *libraries)
    if impl not in choices:
        raise ConfigError(f"model.scan_impl={impl!r} is not one of {', '.join(choices)}")
    if impl in libraries:
        if device_type != impl:
            raise ConfigError(f"model.scan_impl={impl!r} runs on {impl} tensors, these are on {device_type}; use scan_impl=auto")
        if dtype not in KERNEL_DTYPES:
            raise ConfigError(f"model.scan_impl={impl!r} takes float32, bfloat16 or float16 inputs, not {dtype}; "
                              "use scan_impl=chunked or reference")
        reason = kernel_unavailable(libraries[impl])
        if reason is not None:
            raise ConfigError(f"model.scan_impl={impl!r} cannot run: {reason}; use scan_impl=auto or chunked")
    return impl


def resolve_scan_impl(impl: str, device: torch.device, length: int | None = None, dtype=torch.float32) -> str:
    """Map `auto` to a concrete implementation; say in one line why a named one cannot run."""
    return resolve_impl(impl, device, length, dtype, LIBRARIES)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, document_starts):
    batch, channels, length = u.shape
    d_state = A.shape[-1]
    expected = {
        "delta": (delta, (batch, channels, length)),
        "A": (A, (channels, d_state)),
        "B": (B, (batch, d_state, length)),
        "C": (C, (batch, d_state, length)),
        "D": (D, (channels,)),
        "z": (z, (batch, channels, length)),
        "delta_bias": (delta_bias, (channels,)),
        "initial_state": (initial_state, (batch, channels, d_state)),
        "document_starts": (document_starts, (batch, length)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} has shape {tuple(tensor.shape)}, expected {shape}")


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=True,
    initial_state=None,
    impl="auto",
    document_starts=None,
):
    """Selective scan with the official kernel's semantics. Returns (y, last_state).

    document_starts (batch, length), bool: true at the first step of every document packed into a row;
    the state before that step is dropped (its decay is 0), so no document sees another."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, document_starts)
    impl = resolve_scan_impl(impl, u.device, u.shape[-1], u.dtype)
    if impl in FUSED_IMPLS:
        return scan_kernels.scan_fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, document_starts)
    if impl == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, document_starts)
    return _scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, document_starts)


def _scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, document_starts):
    """The chunked recurrence (ops/scan_chunked.py) with the op's softplus, D skip and gate around it."""
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    out_dtype = u.dtype

    u_c, delta_c, B_c, C_c = (t.to(compute) for t in (u, delta, B, C))
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    state = None if initial_state is None else initial_state.to(compute)

    y, last_state = scan_chunked(u_c, delta_c, A.to(compute), B_c, C_c, state, document_starts)

    if D is not None:
        y = y + u_c * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(out_dtype), last_state
