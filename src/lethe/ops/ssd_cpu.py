"""Mamba-2's SSD scan as one fused CPU kernel (kernels/ssd_cpu.cpp, built on first use by
lethe.ops.kernel_build) behind a custom op.

    y, last_state = ssd_fused_cpu(x, dt, A, B, C, D=None, initial_state=None, document_starts=None)

dt is the prepared step size (softplus, bias and clamp already applied: ssd_reference.prepare_dt).
The ops `lethe::ssd_cpu_fwd` / `lethe::ssd_cpu_bwd` are registered with torch.library (fake
implementations and an autograd formula, so torch.compile traces through them without a graph
break); plain eager calls take a shorter way to the same kernels (_EagerSSD).

Forward saves the state entering every chunk of CHUNK steps (batch, nheads, n_chunks, headdim,
d_state), the last state and y before the D skip in float32 (for the decay's gradient, kernels/README.md);
backward recomputes the states in between. Nothing of size batch x length x nheads x headdim x
d_state is kept.
"""

from functools import partial

import torch

from lethe.ops.kernel_ops import eager_autograd, fp32, keep_mask, kernel_library, plain_eager

# Steps per saved chunk state. The backward keeps a tile's recomputed states (64 steps x 8 vectors,
# 16 KB), its B, C and dB/dC rows in L1; 32 and 128 measured slower, and 128 would halve `saved`.
CHUNK = 64


def _ops():
    return kernel_library("ssd_cpu", "cpu SSD")


def _ssd_fwd(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None,
    initial_state: torch.Tensor | None, keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns y, the last state, the chunk-entering states and y before the D skip (float32).
    keep (batch, length) float32: 0 where a document starts (that step's decay is 0), else 1."""
    return tuple(_ops().ssd_fwd(x, dt, A, B, C, D, initial_state, keep, CHUNK))


def _ssd_bwd(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None,
    initial_state: torch.Tensor | None, keep: torch.Tensor | None, saved: torch.Tensor, ys: torch.Tensor,
    last: torch.Tensor, grad_y: torch.Tensor, grad_last: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, dt, A, B, C, D, initial_state (empty where the input is None)."""
    return tuple(_ops().ssd_bwd(x, dt, A, B, C, D, initial_state, keep, CHUNK, saved, ys, last, grad_y, grad_last))


ssd_cpu_fwd = torch.library.custom_op("lethe::ssd_cpu_fwd", _ssd_fwd, mutates_args=())
ssd_cpu_bwd = torch.library.custom_op("lethe::ssd_cpu_bwd", _ssd_bwd, mutates_args=())


@ssd_cpu_fwd.register_fake
def _(x, dt, A, B, C, D, initial_state, keep):
    batch, length, nheads, headdim = x.shape
    n_chunks = -(-length // CHUNK)
    return (x.new_empty(x.shape), x.new_empty(batch, nheads, headdim, B.shape[-1], dtype=torch.float32),
            x.new_empty(batch, nheads, n_chunks, headdim, B.shape[-1], dtype=torch.float32),
            x.new_empty(x.shape, dtype=torch.float32))


@ssd_cpu_bwd.register_fake
def _(x, dt, A, B, C, D, initial_state, keep, saved, ys, last, grad_y, grad_last):
    def like(t):
        return torch.empty_like(t) if t is not None else x.new_empty(0, dtype=torch.float32)
    return (torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(B), torch.empty_like(C),
            like(D), like(initial_state))


def _setup_context(ctx, inputs, output):
    _, last, saved, ys = output
    ctx.save_for_backward(*inputs, saved, ys, last)
    ctx.mark_non_differentiable(saved, ys)
    ctx.set_materialize_grads(False)  # an unused last state stays None instead of a tensor of zeros


def _gradients(ssd_bwd, ctx, grad_y, grad_last):
    """The backward of the forward op, through `ssd_bwd` (the custom op or its implementation)."""
    x, dt, A, B, C, D, initial_state, keep, saved, ys, last = ctx.saved_tensors
    grad_y = torch.zeros_like(x) if grad_y is None else grad_y.contiguous()
    grad_last = None if grad_last is None else grad_last.contiguous()
    grads = ssd_bwd(x, dt, A, B, C, D, initial_state, keep, saved, ys, last, grad_y, grad_last)
    return (*grads[:5], None if D is None else grads[5], None if initial_state is None else grads[6], None)


ssd_cpu_fwd.register_autograd(lambda ctx, grad_y, grad_last, _grad_saved, _grad_ys:
                              _gradients(ssd_cpu_bwd, ctx, grad_y, grad_last), setup_context=_setup_context)


# The same op and autograd for plain eager calls, skipping the custom op's dispatch (kernel_ops.eager_autograd).
_EagerSSD = eager_autograd("_EagerSSD", _ssd_fwd, _setup_context, partial(_gradients, _ssd_bwd))


def ssd_fused_cpu(x, dt, A, B, C, D=None, initial_state=None, document_starts=None):
    """The SSD scan (recurrence, C contraction, D skip) in one kernel, differentiable. x, B, C:
    float32, bfloat16 or float16 (each its own; math in float32); dt (prepared), A, D and
    initial_state are taken in float32; document_starts (batch, length) true where a document
    starts. Returns y in x's dtype and the last state (float32)."""
    scan = _EagerSSD.apply if plain_eager() else ssd_cpu_fwd
    y, last, _, _ = scan(x.contiguous(), fp32(dt), fp32(A), B.contiguous(), C.contiguous(), fp32(D), fp32(initial_state),
                         keep_mask(document_starts))
    return y, last
