"""Packed documents: where each step of a row stands in its own document.

A training block packs several documents (and the ends of others) into one row; `starts`
(batch, length), true at the first step of every document, says where they begin. Every layer
that looks back (the scan's state, the convolution's taps, attention and its RoPE positions)
reads these to see only the step's own document, as if it were alone.
"""

import warnings

import torch
import torch.nn.functional as F

from lethe.errors import ConfigError


def document_positions(starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, seen), each (batch, length): a step's index within its document (0 at a start),
    and whether a start came at or before it. Steps before a row's first start continue a document
    begun earlier (in a previous block or segment): their positions count from the row's start."""
    index = torch.arange(starts.shape[-1], device=starts.device).expand_as(starts)
    last_start = torch.where(starts, index, torch.full_like(index, -1)).cummax(dim=-1).values
    seen = last_start >= 0
    return torch.where(seen, index - last_start, index), seen


def tap_mask(starts: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, width, length) float32: 1 where tap k of a causal convolution of `width` (it reads
    the input width - 1 - k steps back) stays inside the step's document, 0 where it would read
    the previous one. Before a row's first start every tap reads (the zeros or the carried state)."""
    positions, seen = document_positions(starts)
    lags = torch.arange(width - 1, -1, -1, device=starts.device)
    return ((positions[:, None, :] >= lags[None, :, None]) | ~seen[:, None, :]).float()


def document_ids(starts: torch.Tensor) -> torch.Tensor:
    """(batch, length) int: which document of its row a step belongs to (0 before the first start)."""
    return starts.long().cumsum(dim=-1)


def attention_mask(starts: torch.Tensor, queries: slice = slice(None), keys: slice = slice(None)) -> torch.Tensor:
    """(batch, 1, queries, keys) bool, true where query i may attend key j: j <= i, same document
    (by default every query and key of the row; slices give one tile of it)."""
    ids, steps = document_ids(starts), torch.arange(starts.shape[-1], device=starts.device)
    causal = steps[keys] <= steps[queries, None]
    return (causal & (ids[:, queries, None] == ids[:, None, keys]))[:, None]


_compiled_flex = None


def _flex_attention(q, k, v, starts):
    """FlexAttention with the block-diagonal causal mask: blocks of 128 x 128 that the mask empties
    (every pair of different documents) are skipped, not computed and masked. Compiled on CUDA
    (its fast path), eager elsewhere (the same math, for tests on CPU)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
        raise ConfigError("model.attention_impl=flex has no backward on CPU (torch's FlexAttention); "
                          "train on CPU with attention_impl=auto or sdpa")

    ids = document_ids(starts)

    def same_document_causal(b, h, q_index, kv_index):
        return (q_index >= kv_index) & (ids[b, q_index] == ids[b, kv_index])

    length = q.shape[-2]
    block_mask = create_block_mask(same_document_causal, q.shape[0], None, length, length, device=q.device)
    if q.is_cuda:
        _compiled_flex = _compiled_flex or torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask)


def document_attention(q, k, v, starts, impl: str = "auto"):
    """Causal attention within each packed document. q, k, v: (batch, heads, length, head_dim);
    impl: sdpa (boolean mask, in query tiles; any device), flex (FlexAttention), auto (flex on
    CUDA where the head size suits its kernels, else sdpa)."""
    head_dim = q.shape[-1]
    if impl == "auto":
        impl = "flex" if q.is_cuda and head_dim >= 16 and head_dim & (head_dim - 1) == 0 else "sdpa"
    if impl == "flex":
        return _flex_attention(q, k, v, starts)
    return _tiled_sdpa(q, k, v, starts)


QUERY_TILE = 256


def _tiled_sdpa(q, k, v, starts):
    """SDPA with the boolean mask, a tile of QUERY_TILE queries at a time: each tile reads keys
    only from the start of its first query's document (the earliest of the tile) to its last
    query. A masked SDPA alone computes every query-key pair (and holds a length x length mask);
    tiles skip the future, as the causal kernel does, and every key before the tile's documents."""
    length = q.shape[-2]
    document_start = torch.arange(length, device=starts.device) - document_positions(starts)[0]  # (batch, length)
    first_keys = document_start[:, ::QUERY_TILE].min(dim=0).values.tolist()
    tiles = []
    for tile, key_begin in enumerate(first_keys):
        end = min((tile + 1) * QUERY_TILE, length)
        queries, keys = slice(tile * QUERY_TILE, end), slice(key_begin, end)
        tiles.append(F.scaled_dot_product_attention(q[:, :, queries], k[:, :, keys], v[:, :, keys],
                                                    attn_mask=attention_mask(starts, queries, keys)))
    return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=2)
