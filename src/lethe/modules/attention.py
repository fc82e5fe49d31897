"""Causal multi-head self-attention with rotary position embeddings (RoPE, Su et al. 2021).

RoPE rotates each (i, i + head_dim/2) pair of query and key features by an angle
position * theta^(-2i/head_dim) ("rotate-half" layout, as in GPT-NeoX and Llama), so the
query-key dot product depends only on the relative position. There are no learned positions.
"""

import torch
import torch.nn.functional as F
from torch import nn


def rope_angles(length: int, head_dim: int, theta: float, device=None, dtype=torch.float32):
    """cos and sin of the rotation angles, each (length, head_dim), in fp32 (or float64)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=dtype), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """x: (..., length, head_dim). Rotated in cos's dtype (fp32 under autocast), returned in x's."""
    xc = x.to(cos.dtype)
    return (xc * cos + rotate_half(xc) * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, rope_theta: float = 10000.0):
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.rope_theta = rope_theta
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        batch, length, d_model = x.shape
        qkv = self.qkv_proj(x).view(batch, length, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, n_head, length, head_dim)
        # Angles are recomputed per call: (length, head_dim) is negligible next to attention,
        # and it avoids a cache that would have to follow the module across devices.
        angle_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = rope_angles(length, self.head_dim, self.rope_theta, x.device, angle_dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, d_model))
