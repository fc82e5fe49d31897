"""Causal depthwise 1-D convolution (Mamba's short convolution), beside its reference.

`causal_conv1d` pads on the left so output t sees inputs t-width+1 .. t only. The padding is
zeros, or the last width-1 inputs of the previous segment (`initial_states`), which is how
recurrent decoding continues a sequence: a one-token step is this op at length 1 with the
previous inputs as its state.

On CUDA tensors it uses the optional `causal-conv1d` package (`pip install -e .[cuda]`) when
it imports: `causal_conv1d_fn` for a sequence from zeros, `causal_conv1d_update` for a decoding
step. Everywhere else, and for widths it does not support, F.conv1d. The package is imported
lazily; a broken install is reported once and never raised.
"""

import importlib
import importlib.util
import warnings

import torch
import torch.nn.functional as F

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


def _left_context(x, width, initial_states):
    """x with the width-1 inputs before it prepended: zeros, or the carried state."""
    if initial_states is None:
        return F.pad(x, (width - 1, 0))
    return torch.cat([initial_states.to(x.dtype), x], dim=-1)


def causal_conv1d(x, weight, bias=None, activation=None, initial_states=None, return_final_states=False):
    """x: (batch, channels, length); weight: (channels, width); bias: (channels,) or None;
    initial_states: (batch, channels, width - 1) or None (zeros).

    Returns the output (batch, channels, length), and with `return_final_states` also the last
    width-1 inputs (batch, channels, width - 1): the state the next segment continues from.
    """
    channels, width = weight.shape
    package = _package_for(x, width, activation)
    if package is not None and x.shape[-1] == 1 and initial_states is not None:
        # A decoding step: the package shifts the window in place, so it gets a copy.
        state = initial_states.to(x.dtype).contiguous().clone()
        out = package.causal_conv1d_update(x[:, :, 0].contiguous(), state, weight, bias, activation)
        return (out[:, :, None], state) if return_final_states else out[:, :, None]
    if package is not None and initial_states is None and not return_final_states:
        return package.causal_conv1d_fn(x.contiguous(), weight.contiguous(), bias, activation=activation)

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


def causal_conv1d_reference(x, weight, bias=None, activation=None, initial_states=None):
    """Explicit sum over the window: out[t] = sum_k weight[k] * x[t - width + 1 + k]."""
    _, width = weight.shape
    length = x.shape[-1]
    padded = _left_context(x, width, initial_states)
    out = sum(weight[None, :, k, None] * padded[:, :, k : k + length] for k in range(width))
    if bias is not None:
        out = out + bias[None, :, None]
    return F.silu(out) if activation == "silu" else out
