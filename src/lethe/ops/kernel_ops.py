"""What the Python faces of the fused kernels share (ops/scan_kernels.py, ops/ssd_cpu.py, ops/causal_conv1d.py,
ops/ssd_cuda.py): finding a built kernel library, launching a CUDA op on the current stream, and
the eager path around each custom op (the registrations stay with each op).
"""

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from lethe.ops.kernel_build import unavailable

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the input dtypes of the fused scan kernels


def fp32(t):
    """A kernel's float32 operand (A, D, biases, states, masks): contiguous float32, None kept."""
    return None if t is None else t.float().contiguous()


def keep_mask(document_starts):
    """(batch, length) float32, 0 where a packed document starts (the decay there is 0), else 1:
    how the fused scans take document_starts; None without documents."""
    return None if document_starts is None else fp32(~document_starts.bool())


def kernel_library(library: str, name: str):
    """torch.ops.lethe_<library> (kernel_build.SOURCES), built on first use; a RuntimeError that
    names the fused `name` kernel and why, where it cannot be."""
    reason = unavailable(library)
    if reason is not None:
        raise RuntimeError(f"lethe: the fused {name} kernel is unavailable: {reason}")
    return getattr(torch.ops, f"lethe_{library}")


def launch_on_stream(op, device: torch.device, *args):
    """Run a CUDA kernel op, whose last argument is the stream: on a CUDA device under its device
    guard, on its current stream; on CPU tensors (the kernels emulated on CPU threads) stream 0."""
    if device.type != "cuda":
        return op(*args, 0)
    with torch.cuda.device(device):
        return op(*args, torch.cuda.current_stream().cuda_stream)


def plain_eager() -> bool:
    """Outside torch.compile, functorch transforms (vmap) and dispatch-mode tracing (make_fx, fake
    tensors): those need the custom op, whose fake, batching and tracing rules torch knows."""
    return not (torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
                or _get_current_dispatch_mode() is not None)


def eager_autograd(name: str, forward, setup_context, gradients) -> type[torch.autograd.Function]:
    """A custom op's forward and autograd formula as a plain autograd.Function, calling the
    kernels directly, for plain_eager() calls: the custom op's Python dispatch costs ~70 us per
    forward+backward, and ~0.25 ms at batch 2 x 256 x 1024 (the selective scan), where the kernel
    has just pushed the interpreter's data out of the caches (~8% of the call).

    forward(*inputs) -> (y, last state, what backward needs...): only the first two outputs are
    differentiable; setup_context(ctx, inputs, outputs), as registered with the op;
    gradients(ctx, grad_y, grad_last) -> one gradient (or None) per input."""

    def run_forward(ctx, *inputs):  # ctx first, not a separate setup_context: that binds the arguments with inspect, per call
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    @torch.autograd.function.once_differentiable  # the kernel's backward has no derivative: say so, not zeros
    def run_backward(ctx, grad_y, grad_last, *_grad_saved):
        return gradients(ctx, grad_y, grad_last)

    # type(), not a class statement: the Function's name is also its grad_fn's (<name>Backward)
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(run_forward), "backward": staticmethod(run_backward),
                                                   "__module__": forward.__module__})
