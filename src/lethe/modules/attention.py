"""Causal multi-head self-attention with rotary position embeddings (RoPE, Su et al. 2021).

RoPE rotates each (i, i + head_dim/2) pair of query and key features by an angle
position * theta^(-2i/head_dim) ("rotate-half" layout, as in GPT-NeoX and Llama), so the
query-key dot product depends only on the relative position. There are no learned positions.

With a `KVCache` the layer decodes incrementally: new tokens take the positions after the cached
ones, their keys and values are appended, and they attend to everything cached so far. Unlike
Mamba's fixed-size state, the cache grows by one key and one value per token and layer.

With `document_starts` (packed documents, lethe.ops.documents) a token attends only to the earlier
tokens of its own document (a block-diagonal causal mask) and its RoPE position counts from its
document's start, so each document is scored as if it were alone. On CPU SDPA takes the boolean
mask a tile of queries at a time; on CUDA FlexAttention skips the blocks the mask empties.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lethe.ops.documents import document_attention, document_positions

ATTENTION_IMPLS = ("auto", "sdpa", "flex")


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, dtype=torch.float32):
    """cos and sin of the rotation angles at integer `positions` (any shape), each
    (*positions.shape, head_dim), in fp32 (or float64)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim)
    angles = positions.to(dtype)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """x: (..., length, head_dim). Rotated in cos's dtype (fp32 under autocast), returned in x's."""
    xc = x.to(cos.dtype)
    return (xc * cos + rotate_half(xc) * sin).to(x.dtype)


@dataclass
class KVCache:
    """One layer's keys and values so far, preallocated for `capacity` positions.

    keys, values: (batch, n_head, capacity, head_dim), allocated at the first write in the
    dtype of the keys (bf16 under autocast); `length` positions are filled.
    """

    capacity: int
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    length: int = 0
    fixed_size: ClassVar[bool] = False  # the attended length grows every step

    def append(self, k, v):
        """Store k, v (batch, n_head, new, head_dim) after the cached ones; return all so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; cannot append up to {end}")
        if self.keys is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.keys, self.values = k.new_empty(shape), v.new_empty(shape)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, rope_theta: float = 10000.0, attention_impl: str = "auto"):
        """attention_impl, for packed documents: sdpa (a boolean mask, in query tiles), flex (FlexAttention's block
        mask; compiled on CUDA, eager elsewhere) or auto (flex on CUDA, else sdpa)."""
        super().__init__()
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={attention_impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.rope_theta = rope_theta
        self.attention_impl = attention_impl
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def empty_state(self, batch_size: int, max_length: int) -> KVCache:
        """A KV cache for decoding up to max_length positions in all."""
        return KVCache(capacity=max_length)

    def forward(self, x, state: KVCache | None = None, document_starts: torch.Tensor | None = None):
        """x: (batch, length, d_model). With `state`, x continues the cached sequence; with
        `document_starts` (batch, length) bool, x packs documents that must not see each other."""
        batch, length, d_model = x.shape
        start = 0 if state is None else state.length
        if document_starts is not None and start > 0:
            raise ValueError("document_starts applies to a whole sequence, not to one continuing a KV cache")
        qkv = self.qkv_proj(x).view(batch, length, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, n_head, length, head_dim)
        # Angles are recomputed per call: (length, head_dim) is negligible next to attention,
        # and it avoids a cache that would have to follow the module across devices.
        angle_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if document_starts is None:
            positions = torch.arange(start, start + length, device=x.device)
        else:
            positions = document_positions(document_starts)[0][:, None]  # (batch, 1, length): shared by heads
        cos, sin = rope_angles(positions, self.head_dim, self.rope_theta, angle_dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is not None and start == 0:
            state.append(k, v)
        if document_starts is not None:
            y = document_attention(q, k, v, document_starts, self.attention_impl)
        elif start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = state.append(k, v)
            # query i sits at position start + i and sees keys 0 .. start + i
            visible = torch.arange(start + length, device=x.device) <= torch.arange(start, start + length, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, d_model))
