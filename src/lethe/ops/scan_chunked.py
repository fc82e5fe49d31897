"""Chunked parallel selective scan in PyTorch, with a hand-written, recomputing backward.

The recurrence h_t = a_t * h_{t-1} + x_t (a_t = exp(delta_t * A) in (0, 1]) is evaluated in two
levels, like the fused kernel:

  1. split the sequence into K chunks of T steps and scan every chunk at once from a zero
     state: a loop of T steps, each vectorized over all chunks, channels and states;
  2. carry the true state across chunk boundaries (a loop of K steps on small tensors) and add
     it back, weighted by the cumulative decay inside each chunk.

Only products of decays in (0, 1] are ever formed, never exp of a positive cumulative sum, so
it is stable for any length and any delta (a decay that underflows to 0 is the exact limit).

Speed on CPU comes from three choices: (1) a "chunk-time-major" layout (T, batch, channels, K,
d_state), so every step of the inner loop touches one contiguous slab; (2) blocks of channels
small enough to stay in cache (full (batch, channels, length, d_state) temporaries of tens of MB
are slow to allocate and stream); (3) a backward that recomputes the states block by block
instead of storing them, so memory saved for backward is O(batch x channels x length), like the
CUDA kernel's.
"""

import math

import torch

# Elements of one (T, batch, channel-block, K, d_state) temporary: ~4 MB in float32, so the
# handful alive at once stay in a 32 MB L3 cache and below glibc's 32 MB mmap threshold.
BLOCK_ELEMENTS = 1 << 20


def _chunk_length(length: int) -> int:
    # Two loops of ~sqrt(length) steps each minimize the number of Python-level steps.
    return max(1, min(length, 1 << round(math.log2(max(1, length)) / 2)))


def _to_chunks(t, chunk, padded_length):
    """(b, c, L) -> (T, b, c, K), zero-padded at the end to K * T steps, contiguous."""
    b, c, length = t.shape
    t = torch.nn.functional.pad(t, (0, padded_length - length))
    return t.view(b, c, -1, chunk).permute(3, 0, 1, 2).contiguous()


def _from_chunks(t, length):
    """(T, b, c, K) -> (b, c, L)."""
    chunk, b, c, n_chunks = t.shape
    return t.permute(1, 2, 3, 0).reshape(b, c, n_chunks * chunk)[:, :, :length]


def _scan_forward(a, x, h0):
    """In place: x becomes h, with h_t = a_t * h_{t-1} + x_t, and a becomes the cumulative
    decay from each chunk's start, a_0 * ... * a_t. a, x: (T, b, c, K, n)."""
    chunk, b, c, n_chunks, n = x.shape
    decay = a
    for t in range(1, chunk):  # every chunk from a zero state
        x[t].addcmul_(a[t], x[t - 1])
        decay[t].mul_(decay[t - 1])
    entering = x.new_empty(b, c, n_chunks, n)
    state = h0 if h0 is not None else x.new_zeros(b, c, n)
    for k in range(n_chunks):
        entering[:, :, k] = state
        state = torch.addcmul(x[-1, :, :, k], decay[-1, :, :, k], state)
    return x.addcmul_(decay, entering)


def _scan_adjoint(a, g):
    """In place: g becomes lam, with lam_t = g_t + a_{t+1} * lam_{t+1}. a, g: (T, b, c, K, n)."""
    chunk, b, c, n_chunks, n = g.shape
    decay = torch.empty_like(g)  # decay[t] = a_{t+1} * ... * a_{T-1}, within the chunk
    decay[-1] = 1
    for t in range(chunk - 2, -1, -1):
        g[t].addcmul_(a[t + 1], g[t + 1])
        torch.mul(a[t + 1], decay[t + 1], out=decay[t])
    entering = g.new_zeros(b, c, n_chunks, n)  # adjoint arriving from the next chunk
    for k in range(n_chunks - 2, -1, -1):
        first_of_next = torch.addcmul(g[0, :, :, k + 1], decay[0, :, :, k + 1], entering[:, :, k + 1])
        torch.mul(a[0, :, :, k + 1], first_of_next, out=entering[:, :, k])
    return g.addcmul_(decay, entering)


def _channel_blocks(batch, channels, padded_length, d_state):
    size = max(1, BLOCK_ELEMENTS // max(1, batch * padded_length * d_state))
    return [slice(start, min(start + size, channels)) for start in range(0, channels, size)]


class _Chunked:
    """Per-call geometry and the chunk-layout views of B and C shared by all channel blocks."""

    def __init__(self, u, A, B, C, document_starts=None):
        self.batch, self.channels, self.length = u.shape
        self.chunk = _chunk_length(self.length)
        self.padded_length = -(-self.length // self.chunk) * self.chunk
        # (b, n, L) -> (T, b, 1, K, n): broadcast over channels
        self.B = _to_chunks(B, self.chunk, self.padded_length).permute(0, 1, 3, 2)[:, :, None].contiguous()
        self.C = _to_chunks(C, self.chunk, self.padded_length).permute(0, 1, 3, 2)[:, :, None].contiguous()
        self.last = ((self.length - 1) % self.chunk, (self.length - 1) // self.chunk)
        # (b, L) -> (T, b, 1, K, 1): 0 where a document starts (the state before it is dropped); padding keeps 1
        self.keep = None
        if document_starts is not None:
            self.keep = (1 - _to_chunks(document_starts.to(u.dtype)[:, None], self.chunk, self.padded_length))[..., None]
        self.blocks = _channel_blocks(self.batch, self.channels, self.padded_length, A.shape[1])

    def states(self, u, delta, A, h0):
        """Chunk-layout delta, delta*u, decays a and states h of one channel block.

        Padding steps have delta = 0, hence a = 1 and input 0: they leave the state unchanged.
        """
        delta = _to_chunks(delta, self.chunk, self.padded_length)
        du = delta * _to_chunks(u, self.chunk, self.padded_length)
        a = torch.exp(delta[..., None] * A[:, None, :])
        if self.keep is not None:
            a = a * self.keep
        h = _scan_forward(a.clone(), du[..., None] * self.B, h0)
        return delta, du, a, h


class ChunkedSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, document_starts):
        geo = _Chunked(u, A, B, C, document_starts)
        y = u.new_empty(u.shape)
        last = u.new_empty(geo.batch, geo.channels, A.shape[1])
        for blk in geo.blocks:
            _, _, _, h = geo.states(u[:, blk], delta[:, blk], A[blk], None if h0 is None else h0[:, blk])
            y[:, blk] = _from_chunks((h * geo.C).sum(-1), geo.length)
            last[:, blk] = h[geo.last[0], :, :, geo.last[1]]
        ctx.save_for_backward(u, delta, A, B, C, h0, document_starts)
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, delta, A, B, C, h0, document_starts = ctx.saved_tensors
        geo = _Chunked(u, A, B, C, document_starts)
        grad_u, grad_delta, grad_A = torch.zeros_like(u), torch.zeros_like(delta), torch.zeros_like(A)
        grad_B = torch.zeros_like(geo.B[:, :, 0])  # (T, b, K, n), chunk layout
        grad_C = torch.zeros_like(grad_B)
        grad_h0 = None if h0 is None else torch.zeros_like(h0)
        grad_y = torch.zeros_like(u) if grad_y is None else grad_y
        for blk in geo.blocks:
            delta_c, du, a, h = geo.states(u[:, blk], delta[:, blk], A[blk], None if h0 is None else h0[:, blk])
            gy = _to_chunks(grad_y[:, blk], geo.chunk, geo.padded_length)
            # y_t = <C_t, h_t>: dL/dh_t gets dy_t * C_t, and dL/dC_t = sum over channels of dy_t * h_t
            g = gy[..., None] * geo.C
            if grad_last is not None:
                g[geo.last[0], :, :, geo.last[1]] += grad_last[:, blk]
            grad_C += (h * gy[..., None]).sum(2)
            lam = _scan_adjoint(a, g)
            # x_t = (delta u)_t * B_t
            grad_du = (lam * geo.B).sum(-1)
            grad_B += (lam * du[..., None]).sum(2)
            # a_t = exp(delta_t A): dL/d(delta_t A) = lam_t * a_t * h_{t-1} = lam_t * (h_t - x_t)
            grad_log_a = h.sub_(du[..., None] * geo.B).mul_(lam)
            u_c = _to_chunks(u[:, blk], geo.chunk, geo.padded_length)
            grad_delta_c = (grad_log_a * A[blk][:, None, :]).sum(-1) + grad_du * u_c
            grad_delta[:, blk] = _from_chunks(grad_delta_c, geo.length)
            grad_u[:, blk] = _from_chunks(grad_du * delta_c, geo.length)
            grad_A[blk] = (grad_log_a * delta_c[..., None]).sum((0, 1, 3))
            if grad_h0 is not None:
                grad_h0[:, blk] = lam[0, :, :, 0] * a[0, :, :, 0]

        def unchunk(grad):  # (T, b, K, n) -> (b, n, L)
            return _from_chunks(grad.permute(0, 1, 3, 2), geo.length)

        return grad_u, grad_delta, grad_A, unchunk(grad_B), unchunk(grad_C), grad_h0, None


def scan_chunked(u, delta, A, B, C, initial_state=None, document_starts=None):
    """The recurrence alone (delta after softplus, no D or gate): y (b, d, l) and the last state
    (b, d, n). document_starts (b, l): where a document starts, the state before it is dropped."""
    return ChunkedSelectiveScan.apply(u, delta, A, B, C, initial_state, document_starts)
