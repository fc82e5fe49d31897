"""Causal depthwise 1-D convolution (Mamba's short convolution), beside its reference.

`causal_conv1d` pads on the left so output t sees inputs t-width+1 .. t only. It uses
F.conv1d everywhere for now; the kernel issue routes CUDA tensors to the optional
`causal-conv1d` package.
"""

import torch.nn.functional as F


def causal_conv1d(x, weight, bias=None, activation=None):
    """x: (batch, channels, length); weight: (channels, width); bias: (channels,) or None."""
    channels, width = weight.shape
    out = F.conv1d(F.pad(x, (width - 1, 0)), weight[:, None, :], bias, groups=channels)
    return F.silu(out) if activation == "silu" else out


def causal_conv1d_reference(x, weight, bias=None, activation=None):
    """Explicit sum over the window: out[t] = sum_k weight[k] * x[t - width + 1 + k]."""
    _, width = weight.shape
    length = x.shape[-1]
    padded = F.pad(x, (width - 1, 0))
    out = sum(weight[None, :, k, None] * padded[:, :, k : k + length] for k in range(width))
    if bias is not None:
        out = out + bias[None, :, None]
    return F.silu(out) if activation == "silu" else out
