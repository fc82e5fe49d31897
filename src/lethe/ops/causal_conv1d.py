"""Causal depthwise 1-D convolution (Mamba's short convolution), beside its reference.

`causal_conv1d` pads on the left so output t sees inputs t-width+1 .. t only. The padding is
zeros, or the last width-1 inputs of the previous segment (`initial_states`), which is how
recurrent decoding continues a sequence: a one-token step is this op at length 1 with the
previous inputs as its state. It uses F.conv1d everywhere for now; the kernel issue routes
CUDA tensors to the optional `causal-conv1d` package, whose signature this follows.
"""

import torch
import torch.nn.functional as F


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
