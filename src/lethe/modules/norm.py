"""RMSNorm: scale by the root mean square, no mean subtraction, no bias (Zhang & Sennrich 2019)."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Statistics in at least fp32: a mean of squares in bf16 loses digits. torch's fused
        # rms_norm: x * rsqrt(mean(x^2) + eps) * weight, forward and backward in one kernel each.
        compute = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(compute), (x.shape[-1],), self.weight.to(compute), self.eps).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: RMSNorm(x * silu(z)), the statistics taken over groups of
    `group_size` channels (one group per ngroups of B and C, so a model split by groups for
    tensor parallelism normalizes the same way)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, z):
        compute = torch.promote_types(x.dtype, torch.float32)
        gated = x.to(compute) * F.silu(z.to(compute))
        grouped = gated.unflatten(-1, (-1, self.group_size))
        normed = F.rms_norm(grouped, (self.group_size,), None, self.eps).flatten(-2)
        return (normed * self.weight.to(compute)).to(x.dtype)
