"""Causal multi-head self-attention with rotary position embeddings (RoPE, Su et al. 2021).

RoPE rotates each (i, i + head_dim/2) pair of query and key features by an angle
position * theta^(-2i/head_dim) ("rotate-half" layout, as in GPT-NeoX and Llama), so the
query-key dot product depends only on the relative position. There are no learned positions.

With a `KVCache` the layer decodes incrementally: new tokens take the positions after the cached
ones, their keys and values are appended, and they attend to everything cached so far. Unlike
Mamba's fixed-size state, the cache grows by one key and one value per token and layer; with a
sliding `window` (Samba-style hybrids) it holds only the window's positions, as a ring.

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

from lethe.ops.documents import document_positions, masked_attention

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
    """One layer's keys and values, preallocated for `capacity` positions: the whole sequence, or
    (sliding-window attention) only the last `capacity` = window positions, as a ring.

    keys, values: (batch, n_head, capacity, head_dim), allocated at the first write in the dtype
    of the keys (bf16 under autocast); position p sits in slot p % capacity; `length` positions
    were seen, the last min(length, capacity) are held; `limit` positions may be seen in all.
    """

    capacity: int
    limit: int
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    length: int = 0
    fixed_size: ClassVar[bool] = False  # written at a moving slot: no CUDA-graph replay

    def held(self):
        """(keys, values, positions) of what the cache holds, in slot order: slot s holds the
        latest position p < length with p % capacity == s."""
        filled = min(self.length, self.capacity)
        slots = torch.arange(filled, device=self.keys.device)
        positions = slots + self.capacity * ((self.length - 1 - slots) // self.capacity)
        return self.keys[:, :, :filled], self.values[:, :, :filled], positions

    def store(self, k, v):
        """Store k, v (batch, n_head, new, head_dim), the positions after the seen ones (of them
        the last `capacity`, when more come)."""
        if self.length + k.shape[2] > self.limit:
            raise ValueError(f"KV cache holds {self.limit} positions; cannot append up to {self.length + k.shape[2]}")
        if self.keys is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.keys, self.values = k.new_empty(shape), v.new_empty(shape)
        new = k.shape[2]
        keep = min(new, self.capacity)
        first = self.length + new - keep
        if first // self.capacity == (first + keep - 1) // self.capacity:  # one contiguous run of slots
            slots = slice(first % self.capacity, first % self.capacity + keep)
        else:
            slots = torch.arange(first, first + keep, device=k.device) % self.capacity
        self.keys[:, :, slots] = k[:, :, new - keep:]
        self.values[:, :, slots] = v[:, :, new - keep:]
        self.length += new


class CausalSelfAttention(nn.Module):
    kind = "attention"

    def extra_repr(self) -> str:
        window = "" if self.window is None else f", window {self.window}"
        return f"{self.n_head} heads of {self.head_dim}{window}"

    def __init__(self, d_model: int, n_head: int, rope_theta: float = 10000.0, attention_impl: str = "auto",
                 window: int | None = None):
        """attention_impl, for packed documents and windows: sdpa (a boolean mask, in query tiles),
        flex (FlexAttention's block mask; compiled on CUDA, eager elsewhere) or auto (flex on CUDA,
        else sdpa). window: each query sees only the last `window` positions (itself included)."""
        super().__init__()
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={attention_impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.rope_theta = rope_theta
        self.attention_impl = attention_impl
        self.window = window
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def empty_state(self, batch_size: int, max_length: int) -> KVCache:
        """A KV cache for decoding up to max_length positions in all: the window's, if shorter."""
        return KVCache(capacity=max_length if self.window is None else min(self.window, max_length), limit=max_length)

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
        if start == 0:
            y = self._attend(q, k, v, document_starts)
            if state is not None:
                state.store(k, v)
        else:
            y = self._attend_cached(q, k, v, state, positions)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, d_model))

    def _attend(self, q, k, v, document_starts):
        """A whole sequence: the causal kernel, or masks for documents and a window shorter than it."""
        if document_starts is None and (self.window is None or self.window >= q.shape[2]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return masked_attention(q, k, v, document_starts, self.window, self.attention_impl)

    def _attend_cached(self, q, k, v, state: KVCache, positions):
        """New tokens at `positions` after the cached ones: they see the cache and each other,
        causally and within the window; the cache takes them."""
        if q.shape[2] == 1 or state.length + q.shape[2] <= state.capacity:
            # storing first overwrites nothing a new query sees (one token: only the slot that just
            # left the window), so they attend the cache in place, without a copy
            state.store(k, v)
            keys, values, key_positions = state.held()
        else:  # a block of tokens wrapping the window's ring: attend the old slots, then store
            held_k, held_v, held_positions = state.held()
            keys, values = torch.cat([held_k, k], dim=2), torch.cat([held_v, v], dim=2)
            key_positions = torch.cat([held_positions, positions])
            state.store(k, v)
        visible = key_positions <= positions[:, None]
        if self.window is not None:
            visible &= positions[:, None] - key_positions < self.window
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
