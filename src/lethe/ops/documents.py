"""Packed documents: where each step of a row stands in its own document.

A training block packs several documents (and the ends of others) into one row; `starts`
(batch, length), true at the first step of every document, says where they begin. Every layer
that looks back (the scan's state, the convolution's taps, attention and its RoPE positions)
reads these to see only the step's own document, as if it were alone.

Attention's masks live here too: the same tiled path serves documents and sliding windows.
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


def attention_mask(starts: torch.Tensor | None, queries: slice = slice(None), keys: slice = slice(None),
                   window: int | None = None, length: int | None = None, device=None) -> torch.Tensor:
    """(batch or 1, 1, queries, keys) bool, true where query i may attend key j: j <= i, the same
    document (with `starts`; else a row of `length` steps on `device`), and i - j < window (with
    a window); by default every query and key of the row, slices give one tile of it."""
    if starts is not None:
        length, device = starts.shape[-1], starts.device
    steps = torch.arange(length, device=device)
    visible = steps[keys] <= steps[queries, None]
    if window is not None:
        visible = visible & (steps[queries, None] - steps[keys] < window)
    if starts is None:
        return visible[None, None]
    ids = document_ids(starts)
    return (visible & (ids[:, queries, None] == ids[:, None, keys]))[:, None]


_compiled_flex = None


def _flex_attention(q, k, v, starts, window):
    """FlexAttention with the causal mask cut to documents and/or a window: blocks of 128 x 128 that
    the mask empties (every pair of different documents, everything beyond the window) are skipped,
    not computed and masked. Compiled on CUDA (its fast path), eager elsewhere (the same math, for
    tests on CPU)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
        raise ConfigError("model.attention_impl=flex has no backward on CPU (torch's FlexAttention); "
                          "train on CPU with attention_impl=auto or sdpa")

    ids = document_ids(starts) if starts is not None else None

    def visible(b, h, q_index, kv_index):
        keep = q_index >= kv_index
        if window is not None:
            keep = keep & (q_index - kv_index < window)
        if ids is not None:
            keep = keep & (ids[b, q_index] == ids[b, kv_index])
        return keep

    length = q.shape[-2]
    batch = q.shape[0] if ids is not None else None
    block_mask = create_block_mask(visible, batch, None, length, length, device=q.device)
    if q.is_cuda:
        _compiled_flex = _compiled_flex or torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask)


def masked_attention(q, k, v, starts=None, window: int | None = None, impl: str = "auto"):
    """Causal attention within each packed document (`starts`) and/or within a sliding `window`.
    q, k, v: (batch, heads, length, head_dim); impl: sdpa (boolean mask, in query tiles; any
    device), flex (FlexAttention), auto (flex on CUDA where the head size suits its kernels, else
    sdpa)."""
    head_dim = q.shape[-1]
    if impl == "auto":
        impl = "flex" if q.is_cuda and head_dim >= 16 and head_dim & (head_dim - 1) == 0 else "sdpa"
    if impl == "flex":
        return _flex_attention(q, k, v, starts, window)
    return _tiled_sdpa(q, k, v, starts, window)


QUERY_TILE = 256


def _tiled_sdpa(q, k, v, starts, window):
    """SDPA with the boolean mask, a tile of QUERY_TILE queries at a time: each tile reads keys
    only from the earliest one a query of the tile may see (its first query's document start, or
    window - 1 before it) to its last query. A masked SDPA alone computes every query-key pair (and
    holds a length x length mask); tiles skip the future, as the causal kernel does, and every key
    before the tile's documents or window."""
    length = q.shape[-2]
    first_keys = [0] * len(range(0, length, QUERY_TILE))
    if starts is not None:  # data-dependent: where the tiles' documents start
        document_start = torch.arange(length, device=starts.device) - document_positions(starts)[0]  # (batch, length)
        first_keys = document_start[:, ::QUERY_TILE].min(dim=0).values.tolist()
    if window is not None:  # static: a window alone traces as one graph (torch.compile)
        first_keys = [max(key, tile * QUERY_TILE - window + 1) for tile, key in enumerate(first_keys)]
    tiles = []
    for tile, key_begin in enumerate(first_keys):
        end = min((tile + 1) * QUERY_TILE, length)
        queries, keys = slice(tile * QUERY_TILE, end), slice(key_begin, end)
        mask = attention_mask(starts, queries, keys, window, length, q.device)
        tiles.append(F.scaled_dot_product_attention(q[:, :, queries], k[:, :, keys], v[:, :, keys], attn_mask=mask))
    return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=2)
