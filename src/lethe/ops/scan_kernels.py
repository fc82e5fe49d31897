"""The fused selective-scan kernels of `kernels/` behind custom ops: the op, not the build
(lethe.ops.kernel_build compiles the kernels on first use).

    y, last_state = scan_fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)

One op, `lethe::selective_scan_fwd` / `lethe::selective_scan_bwd`, registered with
torch.library (autograd formula and fake implementation included, so torch.compile, vmap and
make_fx trace through it without a graph break; plain eager calls take a shorter way to the same
kernels, _EagerScan), dispatching on the device to:

  cpu   kernels/selective_scan_cpu.cpp: threaded over (batch, channel), vectorized over d_state
  cuda  kernels/selective_scan_cuda.cu: one thread block per (batch, channel), a block-wide
        parallel scan over time (kernels/README.md has the design)

Forward saves the state entering every chunk of `CHUNK[device]` steps (batch, channels,
n_chunks, d_state) and, with z on CUDA, the output before the gate; backward recomputes the
rest. Nothing of size batch x channels x length x d_state is kept.
"""

from functools import partial

import torch

from lethe.ops.kernel_ops import eager_autograd, fp32, keep_mask, kernel_library, launch_on_stream, plain_eager

# Steps per saved chunk state. CUDA: 128 threads x 8 steps each (fixed in the kernel). CPU: the
# backward's working set per chunk (decays, states, B, C and the dB/dC partial rows: 6 x 64 x 16
# floats at d_state 16) stays in a 48 KB L1; 128-step chunks measured a ~20% slower backward.
CHUNK = {"cpu": 64, "cuda": 1024}


def _launch(op_name: str, u, args):
    """Run a kernel op for u's device: the CPU kernel takes no stream, the CUDA one u's current one."""
    op = getattr(kernel_library(u.device.type, f"{u.device.type} scan"), op_name)
    return op(*args) if u.device.type == "cpu" else launch_on_stream(op, u.device, *args)


def _n_chunks(u) -> int:
    return -(-u.shape[-1] // CHUNK[u.device.type])


def _scan_fwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None, keep: torch.Tensor | None, delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns y, the last state, the chunk-entering states and (with z) y before the gate. keep
    (batch, length) float32: 0 where a document starts (that step's decay is 0), else 1."""
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, keep, delta_softplus, CHUNK[u.device.type])
    return tuple(_launch("scan_fwd", u, args))


def _scan_bwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None, keep: torch.Tensor | None, delta_softplus: bool, saved: torch.Tensor,
    y_pre: torch.Tensor, grad_y: torch.Tensor, grad_last: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of u, delta, A, B, C, D, z, delta_bias, initial_state (empty where the input is None)."""
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, keep, delta_softplus, CHUNK[u.device.type], saved)
    return tuple(_launch("scan_bwd", u, (*args, y_pre, grad_y, grad_last)))


# The custom ops torch.compile, vmap and make_fx trace (fake implementations below; no graph break).
selective_scan_fwd = torch.library.custom_op("lethe::selective_scan_fwd", _scan_fwd, mutates_args=())
selective_scan_bwd = torch.library.custom_op("lethe::selective_scan_bwd", _scan_bwd, mutates_args=())


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, keep, delta_softplus):
    batch, channels, _ = u.shape
    d_state = A.shape[1]
    y_pre = u.new_empty(u.shape) if z is not None else u.new_empty(0)
    return (u.new_empty(u.shape), u.new_empty(batch, channels, d_state, dtype=torch.float32),
            u.new_empty(batch, channels, _n_chunks(u), d_state, dtype=torch.float32), y_pre)


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, keep, delta_softplus, saved, y_pre, grad_y, grad_last):
    def like(t):
        return torch.empty_like(t) if t is not None else u.new_empty(0, dtype=torch.float32)
    grad_z = torch.empty_like(u) if z is not None else u.new_empty(0)
    return (torch.empty_like(u), torch.empty_like(u), torch.empty_like(A), torch.empty_like(B), torch.empty_like(C),
            like(D), grad_z, like(delta_bias), like(initial_state))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, keep, delta_softplus = inputs
    _, _, saved, y_pre = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, keep, saved, y_pre)
    ctx.delta_softplus = delta_softplus
    ctx.mark_non_differentiable(saved, y_pre)
    ctx.set_materialize_grads(False)  # an unused last state stays None instead of a tensor of zeros


def _gradients(scan_bwd, ctx, grad_y, grad_last):
    """The backward of the forward op, through `scan_bwd` (the custom op or its implementation)."""
    u, delta, A, B, C, D, z, delta_bias, initial_state, keep, saved, y_pre = ctx.saved_tensors
    grad_y = torch.zeros_like(u) if grad_y is None else grad_y.contiguous()
    grad_last = None if grad_last is None else grad_last.contiguous()
    grads = scan_bwd(u, delta, A, B, C, D, z, delta_bias, initial_state, keep, ctx.delta_softplus, saved, y_pre, grad_y,
                     grad_last)
    optional_inputs = {5: D, 6: z, 7: delta_bias, 8: initial_state}
    grads = [None if optional_inputs.get(i, True) is None else g for i, g in enumerate(grads)]
    return (*grads, None, None)  # keep and delta_softplus have none


selective_scan_fwd.register_autograd(lambda ctx, grad_y, grad_last, _grad_saved, _grad_y_pre:
                                     _gradients(selective_scan_bwd, ctx, grad_y, grad_last), setup_context=_setup_context)


# The same op and autograd for plain eager calls, skipping the custom op's dispatch (kernel_ops.eager_autograd).
_EagerScan = eager_autograd("_EagerScan", _scan_fwd, _setup_context, partial(_gradients, _scan_bwd))


def scan_fused(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, initial_state=None, document_starts=None):
    """The whole selective scan (softplus, recurrence, C contraction, D skip, SiLU gate) in one
    kernel. u's dtype (float32, bfloat16 or float16) is the dtype of delta, B, C, z and y; A, D,
    delta_bias and the states are float32; document_starts (batch, length) true where a document starts.
    Returns y and the last state (float32)."""
    dtype = u.dtype

    def like_u(t):
        return None if t is None else t.to(dtype).contiguous()

    scan = _EagerScan.apply if plain_eager() else selective_scan_fwd
    y, last, _, _ = scan(u.contiguous(), like_u(delta), fp32(A), like_u(B), like_u(C), fp32(D), like_u(z),
                         fp32(delta_bias), fp32(initial_state), keep_mask(document_starts), bool(delta_softplus))
    return y, last
