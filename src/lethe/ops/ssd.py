"""Mamba-2's SSD scan behind one function, with interchangeable implementations.

    y, last_state = ssd_scan(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state,
                             impl="auto", document_starts=None, chunk_size=256)

Shapes follow the reference's `mamba_chunk_scan_combined` (time-major, the layout in_proj
produces): x (batch, length, nheads, headdim); dt (batch, length, nheads); A, dt_bias (nheads,);
B, C (batch, length, ngroups, d_state), shared by the nheads / ngroups heads of a group; D
(nheads,) or (nheads, headdim); states (batch, nheads, headdim, d_state); document_starts (batch,
length) bool, where packed documents begin (every impl resets there). All math and the state are
float32 (float64 stays float64, for gradcheck); y comes back in x's dtype.

Implementations:
  reference  ssd_scan_ref: the recurrence as one sequential loop, the ground truth (ops/ssd_reference.py)
  chunked    the SSD block decomposition, mostly matmuls (ops/ssd_chunked.py)
  cpu, cuda  the fused kernels of kernels/ (ops/ssd_cpu.py, ops/ssd_cuda.py), built on first use:
             the recurrence with the state kept on chip, the C contraction and the D skip in one
             pass; the backward recomputes states from saved chunk boundaries
  auto       the fused kernel for the inputs' device when it builds (float32/bfloat16/float16),
             else chunked; a single step (recurrent decoding) is the reference's few ops
"""

import torch

from lethe.ops.selective_scan import resolve_impl
from lethe.ops.ssd_chunked import ssd_chunked
from lethe.ops.ssd_cpu import ssd_fused_cpu
from lethe.ops.ssd_cuda import ssd_fused_cuda
from lethe.ops.ssd_reference import prepare_dt, ssd_scan_ref

FUSED = {"cpu": ssd_fused_cpu, "cuda": ssd_fused_cuda}
LIBRARIES = {"cpu": "ssd_cpu", "cuda": "ssd_cuda"}  # FUSED's kernels in kernel_build
SSD_IMPL_CHOICES = ("auto", "reference", "chunked", *FUSED)


def resolve_ssd_impl(impl: str, device: torch.device, length: int | None = None, dtype=torch.float32) -> str:
    """Map `auto` to a concrete implementation; say in one line why a named one cannot run."""
    return resolve_impl(impl, device, length, dtype, LIBRARIES)


def _check_shapes(x, dt, A, B, C, D, dt_bias, initial_state, document_starts, chunk_size):
    if x.ndim != 4 or B.ndim != 4:
        raise ValueError(f"ssd_scan: x and B must be 4-d, got x {tuple(x.shape)}, B {tuple(B.shape)}")
    batch, length, nheads, headdim = x.shape
    ngroups, d_state = B.shape[2], B.shape[3]
    if ngroups < 1 or nheads % ngroups:
        raise ValueError(f"ssd_scan: ngroups={ngroups} must divide nheads={nheads}")
    expected = {
        "dt": (dt, [(batch, length, nheads)]),
        "A": (A, [(nheads,)]),
        "B": (B, [(batch, length, ngroups, d_state)]),
        "C": (C, [(batch, length, ngroups, d_state)]),
        "D": (D, [(nheads,), (nheads, headdim)]),
        "dt_bias": (dt_bias, [(nheads,)]),
        "initial_state": (initial_state, [(batch, nheads, headdim, d_state)]),
        "document_starts": (document_starts, [(batch, length)]),
    }
    for name, (tensor, shapes) in expected.items():
        if tensor is not None and tuple(tensor.shape) not in shapes:
            raise ValueError(f"ssd_scan: {name} has shape {tuple(tensor.shape)}, expected {' or '.join(map(str, shapes))}")
    if chunk_size < 1:
        raise ValueError(f"ssd_scan: chunk_size={chunk_size} must be >= 1")


def ssd_scan(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=None, initial_state=None,
             impl="auto", document_starts=None, chunk_size=256):
    """Mamba-2's scan. Returns (y, last_state).

    dt_limit: None or (min, max), the clamp of the step size after softplus. document_starts
    (batch, length) bool: true at the first step of every document packed into a row; the state
    before that step is dropped (its decay is 0), so no document sees another."""
    _check_shapes(x, dt, A, B, C, D, dt_bias, initial_state, document_starts, chunk_size)
    impl = resolve_ssd_impl(impl, x.device, x.shape[1], x.dtype)
    args = (x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state, document_starts)
    if impl == "reference":
        return ssd_scan_ref(*args)
    if impl in FUSED:
        dt = prepare_dt(dt, dt_bias, dt_softplus, dt_limit, torch.float32)
        return FUSED[impl](x, dt, A, B, C, D, initial_state, document_starts)
    return ssd_chunked(*args, chunk_size=chunk_size)
