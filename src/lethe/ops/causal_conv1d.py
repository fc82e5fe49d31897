"""Causal depthwise 1-D convolution (Mamba's short convolution), beside its reference.

`causal_conv1d` pads on the left so output t sees inputs t-width+1 .. t only. The padding is
zeros, or the last width-1 inputs of the previous segment (`initial_states`), which is how
recurrent decoding continues a sequence: a one-token step is this op at length 1 with the
previous inputs as its state.

On CPU tensors (float32, bfloat16, float16) a sequence goes through Lethe's fused kernel
(kernels/causal_conv1d_cpu.cpp, built on first use like the scan's): bias and SiLU fused,
forward and backward, states in and out, deterministic gradients; it is the custom op
`lethe::causal_conv1d_fwd` / `_bwd`, which torch.compile traces without a graph break. On CUDA
tensors the optional `causal-conv1d` package (`pip install -e .[cuda]`) when it imports:
`causal_conv1d_fn` for a sequence from zeros (with packed documents through its `seq_idx`, where
the installed version has it), `causal_conv1d_update` for a decoding step. Anything
else (float64, a kernel that did not build, a decoding step on CPU) takes F.conv1d or the
window's dot product. The package is imported lazily; a broken install is reported once and never
raised.
"""

import importlib
import importlib.util
import inspect
import warnings

import torch
import torch.nn.functional as F

from lethe.ops.documents import document_ids, tap_mask
from lethe.ops.kernel_build import unavailable
from lethe.ops.kernel_ops import fp32

PACKAGE_WIDTHS = (2, 3, 4)  # the widths causal-conv1d's kernels are built for
_package = None  # the imported causal_conv1d module; False once known to be unavailable


def cuda_package():
    """The `causal_conv1d` module, or None when it is not installed or does not import."""
    global _package
    if _package is None:
        _package = False
        if importlib.util.find_spec("causal_conv1d") is not None:
            try:
                _package = importlib.import_module("causal_conv1d")
            except Exception as exc:  # a build for another torch/CUDA: report it, keep running
                warnings.warn(f"lethe: causal-conv1d is installed but does not import ({type(exc).__name__}: {exc}); "
                              "using F.conv1d for the short convolution", stacklevel=2)
    return _package or None


def _package_for(x, width, activation):
    if not x.is_cuda or width not in PACKAGE_WIDTHS or activation not in (None, "silu"):
        return None
    return cuda_package()


def _takes_seq_idx(package) -> bool:
    """Whether this causal-conv1d version resets at document boundaries (seq_idx, from 1.2)."""
    return "seq_idx" in inspect.signature(package.causal_conv1d_fn).parameters


def _left_context(x, width, initial_states):
    """x with the width-1 inputs before it prepended: zeros, or the carried state."""
    if initial_states is None:
        return F.pad(x, (width - 1, 0))
    return torch.cat([initial_states.to(x.dtype), x], dim=-1)


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# torch.compile runs this at trace time and keeps its answer: the first trace builds the kernel
kernel_unavailable = torch.compiler.assume_constant_result(unavailable)


def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, initial_states: torch.Tensor | None,
              taps: torch.Tensor | None, silu: bool, return_final: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.ops.lethe_conv_cpu.conv_fwd(x, weight, bias, initial_states, taps, silu, return_final))


def _conv_bwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, initial_states: torch.Tensor | None,
              taps: torch.Tensor | None, silu: bool, grad_out: torch.Tensor, grad_final: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.ops.lethe_conv_cpu.conv_bwd(x, weight, bias, initial_states, taps, silu, grad_out, grad_final))


conv_fwd_op = torch.library.custom_op("lethe::causal_conv1d_fwd", _conv_fwd, mutates_args=())
conv_bwd_op = torch.library.custom_op("lethe::causal_conv1d_bwd", _conv_bwd, mutates_args=())


@conv_fwd_op.register_fake
def _(x, weight, bias, initial_states, taps, silu, return_final):
    final_shape = (x.shape[0], x.shape[1], weight.shape[1] - 1) if return_final else (0,)
    return torch.empty_like(x), x.new_empty(final_shape, dtype=torch.float32)


@conv_bwd_op.register_fake
def _(x, weight, bias, initial_states, taps, silu, grad_out, grad_final):
    def like(t):
        return torch.empty_like(t) if t is not None else x.new_empty(0, dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(weight), like(bias), like(initial_states)


def _setup_context(ctx, inputs, output):
    x, weight, bias, initial_states, taps, silu, _ = inputs
    ctx.save_for_backward(x, weight, bias, initial_states, taps)
    ctx.silu = silu
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_final):
    x, weight, bias, initial_states, taps = ctx.saved_tensors
    grad_out = torch.zeros_like(x) if grad_out is None else grad_out.contiguous()
    grad_final = None if grad_final is None else grad_final.float().contiguous()
    grad_x, grad_w, grad_b, grad_init = conv_bwd_op(x, weight, bias, initial_states, taps, ctx.silu, grad_out, grad_final)
    return (grad_x, grad_w, grad_b if bias is not None else None, grad_init if initial_states is not None else None,
            None, None, None)


conv_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _use_kernel(x, width, activation) -> bool:
    return (x.device.type == "cpu" and x.dtype in KERNEL_DTYPES and x.shape[-1] > 1 and width <= 8
            and activation in (None, "silu") and kernel_unavailable("conv_cpu") is None)


def causal_conv1d(x, weight, bias=None, activation=None, initial_states=None, return_final_states=False,
                  document_starts=None):
    """x: (batch, channels, length); weight: (channels, width); bias: (channels,) or None;
    initial_states: (batch, channels, width - 1) or None (zeros); document_starts: (batch, length)
    bool, true where a packed document begins: no tap reads across it (ops/documents.py).

    Returns the output (batch, channels, length), and with `return_final_states` also the last
    width-1 inputs (batch, channels, width - 1): the state the next segment continues from.
    """
    channels, width = weight.shape
    package, use_kernel = _package_for(x, width, activation), _use_kernel(x, width, activation)
    if document_starts is not None and not use_kernel:
        if package is not None and initial_states is None and not return_final_states and _takes_seq_idx(package):
            # the package resets where seq_idx changes, in its channels-last layout only
            channels_last = x.transpose(1, 2).contiguous().transpose(1, 2)
            seq_idx = document_ids(document_starts).to(torch.int32).contiguous()
            return package.causal_conv1d_fn(channels_last, weight.contiguous(), bias, seq_idx=seq_idx, activation=activation)
        out = causal_conv1d_reference(x, weight, bias, activation, initial_states, document_starts)
        return (out, _left_context(x, width, initial_states)[:, :, -(width - 1):]) if return_final_states else out
    if package is not None and x.shape[-1] == 1 and initial_states is not None:
        # A decoding step: the package shifts the window in place, so it gets a copy.
        state = initial_states.to(x.dtype).contiguous().clone()
        out = package.causal_conv1d_update(x[:, :, 0].contiguous(), state, weight, bias, activation)
        return (out[:, :, None], state) if return_final_states else out[:, :, None]
    if package is not None and initial_states is None and not return_final_states:
        return package.causal_conv1d_fn(x.contiguous(), weight.contiguous(), bias, activation=activation)
    if use_kernel:
        taps = None if document_starts is None else tap_mask(document_starts, width)
        out, final = conv_fwd_op(x.contiguous(), fp32(weight), fp32(bias), fp32(initial_states), taps, activation == "silu",
                                 bool(return_final_states))
        return (out, final) if return_final_states else out

    padded = _left_context(x, width, initial_states)
    if x.shape[-1] == 1:
        # A decoding step: one output is a dot product with the window; oneDNN's convolution
        # would spend ~80 us setting up per call (on CPU), several times the rest of the layer.
        out = (padded * weight).sum(-1, keepdim=True)
        out = out if bias is None else out + bias[:, None]
    else:
        out = F.conv1d(padded, weight[:, None, :], bias, groups=channels)
    out = F.silu(out) if activation == "silu" else out
    if return_final_states:
        return out, padded[:, :, padded.shape[-1] - (width - 1):]
    return out


def causal_conv1d_reference(x, weight, bias=None, activation=None, initial_states=None, document_starts=None):
    """Explicit sum over the window: out[t] = sum_k weight[k] * x[t - width + 1 + k], a tap left out
    where it would read the previous packed document."""
    _, width = weight.shape
    length = x.shape[-1]
    padded = _left_context(x, width, initial_states)
    if document_starts is None:
        taps = torch.ones(1, width, length, dtype=x.dtype, device=x.device)
    else:
        taps = tap_mask(document_starts, width).to(x.dtype)
    out = sum(weight[None, :, k, None] * padded[:, :, k : k + length] * taps[:, None, k] for k in range(width))
    if bias is not None:
        out = out + bias[None, :, None]
    return F.silu(out) if activation == "silu" else out
