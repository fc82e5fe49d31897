"""Mamba-2's SSD scan as one fused CUDA kernel (kernels/ssd_cuda.cu) behind custom ops: the op,
not the build (lethe.ops.kernel_build compiles the kernel on first use).

    y, last_state = ssd_fused_cuda(x, dt, A, B, C, D=None, initial_state=None, document_starts=None)

dt comes prepared (bias, softplus and clamp applied, float32). One op, `lethe::ssd_cuda_fwd` /
`lethe::ssd_cuda_bwd`, registered with torch.library (autograd formula and fake implementation
included, so torch.compile traces through it without a graph break; plain eager calls take a
shorter way to the same kernels, _EagerSSD). Forward saves the state entering every segment of
SEGMENT steps (batch, nheads, n_segments, headdim, d_state); backward recomputes the rest.

Tests run the same path on CPU tensors through the CUDA source emulated on CPU threads
(torch.ops.lethe_ssd_cuda_emulated, kernels/cuda_emulation.h) by setting EMULATE_ON_CPU.
"""

from functools import partial

import torch

from lethe.ops.kernel_ops import eager_autograd, fp32, keep_mask, kernel_library, launch_on_stream, plain_eager

SEGMENT = 256  # steps per saved state: kSegment in kernels/ssd_cuda.h
EMULATE_ON_CPU = False  # CPU tensors run the emulated CUDA kernel (tests only: slow by design)


def _kernel_ops(device_type: str):
    if device_type == "cuda":
        library = "ssd_cuda"
    elif device_type == "cpu" and EMULATE_ON_CPU:
        library = "ssd_cuda_emulated"
    else:
        raise RuntimeError(f"lethe: the fused CUDA SSD kernel runs on CUDA tensors, these are on {device_type}")
    return kernel_library(library, library)


def _launch(op_name: str, x, args):
    """Run a kernel op for x's device: on CUDA on its current stream, on CPU emulated."""
    return launch_on_stream(getattr(_kernel_ops(x.device.type), op_name), x.device, *args)


def _ssd_fwd(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None,
    initial_state: torch.Tensor | None, keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns y, the last state and the segment-entering states. keep (batch, length) float32:
    0 where a document starts (that step's decay is 0), else 1."""
    return tuple(_launch("ssd_fwd", x, (x, dt, A, B, C, D, initial_state, keep, SEGMENT)))


def _ssd_bwd(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None,
    initial_state: torch.Tensor | None, keep: torch.Tensor | None, saved: torch.Tensor, grad_y: torch.Tensor,
    grad_last: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, dt, A, B, C, D, initial_state (empty where the input is None)."""
    return tuple(_launch("ssd_bwd", x, (x, dt, A, B, C, D, initial_state, keep, SEGMENT, saved, grad_y, grad_last)))


ssd_cuda_fwd = torch.library.custom_op("lethe::ssd_cuda_fwd", _ssd_fwd, mutates_args=())
ssd_cuda_bwd = torch.library.custom_op("lethe::ssd_cuda_bwd", _ssd_bwd, mutates_args=())


@ssd_cuda_fwd.register_fake
def _(x, dt, A, B, C, D, initial_state, keep):
    batch, length, nheads, headdim = x.shape
    d_state = B.shape[-1]
    return (x.new_empty(x.shape), x.new_empty(batch, nheads, headdim, d_state, dtype=torch.float32),
            x.new_empty(batch, nheads, -(-length // SEGMENT), headdim, d_state, dtype=torch.float32))


@ssd_cuda_bwd.register_fake
def _(x, dt, A, B, C, D, initial_state, keep, saved, grad_y, grad_last):
    def like(t):
        return torch.empty_like(t) if t is not None else x.new_empty(0, dtype=torch.float32)
    return (torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(B), torch.empty_like(C),
            like(D), like(initial_state))


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, initial_state, keep = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, initial_state, keep, output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # an unused last state stays None instead of a tensor of zeros


def _gradients(ssd_bwd, ctx, grad_y, grad_last):
    """The backward of the forward op, through `ssd_bwd` (the custom op or its implementation)."""
    x, dt, A, B, C, D, initial_state, keep, saved = ctx.saved_tensors
    grad_y = torch.zeros_like(x) if grad_y is None else grad_y.contiguous()
    grad_last = None if grad_last is None else grad_last.contiguous()
    grads = ssd_bwd(x, dt, A, B, C, D, initial_state, keep, saved, grad_y, grad_last)
    optional_inputs = {5: D, 6: initial_state}
    grads = [None if optional_inputs.get(i, True) is None else g for i, g in enumerate(grads)]
    return (*grads, None)  # keep has none


ssd_cuda_fwd.register_autograd(lambda ctx, grad_y, grad_last, _grad_saved: _gradients(ssd_cuda_bwd, ctx, grad_y, grad_last),
                               setup_context=_setup_context)


# The same op and autograd for plain eager calls, skipping the custom op's dispatch (kernel_ops.eager_autograd).
_EagerSSD = eager_autograd("_EagerSSD", _ssd_fwd, _setup_context, partial(_gradients, _ssd_bwd))


def ssd_fused_cuda(x, dt, A, B, C, D=None, initial_state=None, document_starts=None):
    """The SSD scan (decay, recurrence, C contraction, D skip) in one kernel, dt already prepared.
    x's dtype (float32, bfloat16 or float16) is the dtype of B, C and y; dt, A, D and the states
    are float32; document_starts (batch, length) true where a document starts. Returns y and the
    last state (float32)."""
    dtype = x.dtype

    def like_x(t):
        return t.to(dtype).contiguous()

    scan = _EagerSSD.apply if plain_eager() else ssd_cuda_fwd
    y, last, _ = scan(x.contiguous(), fp32(dt), fp32(A), like_x(B), like_x(C), fp32(D), fp32(initial_state),
                      keep_mask(document_starts))
    return y, last
