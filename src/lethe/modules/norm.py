"""RMSNorm: scale by the root mean square, no mean subtraction, no bias (Zhang & Sennrich 2019)."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Statistics in at least fp32: a mean of squares in bf16 loses digits.
        compute = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(compute)
        normed = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(compute)).to(x.dtype)
