"""The selective scan behind one function, with interchangeable implementations.

    y, last_state = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                   initial_state, impl="auto")

Shapes follow the official kernel: u, delta, z (batch, channels, length); A (channels, d_state);
B, C (batch, d_state, length); D, delta_bias (channels,); states (batch, channels, d_state).
Inputs may be float32, bfloat16 or float16: all math and the state are float32 (float64 stays
float64, for gradcheck). y comes back in u's dtype, the state in float32 (or float64).

The implementations share everything around the recurrence (softplus, D skip, SiLU gate), so
they differ only in how the linear recurrence itself is evaluated:
  reference  sequential loop, the ground truth (ops/scan_reference.py)
  chunked    chunked parallel PyTorch with a hand-written backward (ops/scan_chunked.py)
  auto       the fastest implementation available for the inputs' device and length
"""

import torch
import torch.nn.functional as F

from lethe.errors import ConfigError
from lethe.ops.scan_chunked import scan_chunked
from lethe.ops.scan_reference import scan_reference

SCAN_IMPLS = {"reference": scan_reference, "chunked": scan_chunked}
SCAN_IMPL_CHOICES = ("auto", *SCAN_IMPLS)


def resolve_scan_impl(impl: str, device: torch.device, length: int | None = None) -> str:
    """Map `auto` to a concrete implementation; reject unknown names in one line."""
    if impl == "auto":
        # One step (recurrent decoding) is the recurrence itself: the loop has the least overhead.
        return "reference" if length == 1 else "chunked"
    if impl not in SCAN_IMPLS:
        raise ConfigError(f"model.scan_impl={impl!r} is not one of {', '.join(SCAN_IMPL_CHOICES)}")
    return impl


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state):
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
):
    """Selective scan with the official kernel's semantics. Returns (y, last_state)."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    out_dtype = u.dtype

    u_c, delta_c, B_c, C_c = (t.to(compute) for t in (u, delta, B, C))
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    state = None if initial_state is None else initial_state.to(compute)

    scan = SCAN_IMPLS[resolve_scan_impl(impl, u.device, u.shape[-1])]
    y, last_state = scan(u_c, delta_c, A.to(compute), B_c, C_c, state)

    if D is not None:
        y = y + u_c * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(out_dtype), last_state
