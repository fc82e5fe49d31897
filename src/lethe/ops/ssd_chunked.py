"""Mamba-2's SSD scan in its chunked ("block decomposition") form, in plain PyTorch: mostly
matrix multiplies, stable at any length, traceable by torch.compile(fullgraph=True), with a
hand-written backward that saves only the inputs and the chunk-entering states.

With a_t = dt_t * A (the log of the decay, <= 0) and xdt_t = dt_t * x_t, the sequence is cut into
chunks of Q steps and the output is the sum of two parts (Dao & Gu 2024, section 6):

  1. inside a chunk, a causal "attention" with a decay mask L:
         Y_diag[l] = sum_{s <= l} (C_l . B_s) * L[l, s] * xdt_s,   L = exp(segsum(a)),
     segsum[l, s] = a_{s+1} + ... + a_l, a masked cumulative sum (never the difference of two
     running sums, which loses precision and turns -inf into nan);
  2. across chunks, through states: each chunk's state at its end from its own inputs
     (S = sum_s L[Q-1, s] * outer(xdt_s, B_s)), a short recurrence over chunk boundaries that
     carries the state in (initial_state first), and each position reading the state E that
     entered its chunk through C, decayed by exp(a_0 + ... + a_l):
         Y_off[l] = exp(cumsum(a)[l]) * C_l . E.

Every exponent is a sum of non-positive terms, so nothing overflows. A document start sets
a_t = -inf: every decay across it is exactly 0, inside a chunk and across chunk boundaries alike.

Einsum letters: b batch, c chunk, g group, h head within its group, q/l/s step within a chunk,
p head channel, n state.
"""

import math

import torch
import torch.nn.functional as F

from lethe.ops.ssd_reference import prepare_dt


def segment_sums(a):
    """a (..., Q) -> (..., Q, Q): [l, s] = a_{s+1} + ... + a_l for s <= l, -inf above the diagonal."""
    Q = a.shape[-1]
    ones = torch.ones(Q, Q, dtype=torch.bool, device=a.device)
    sums = a[..., :, None].expand(*a.shape, Q).masked_fill(~ones.tril(-1), 0).cumsum(dim=-2)
    return sums.masked_fill(~ones.tril(0), -math.inf)


def segment_sums_backward(grad):
    """The gradient with respect to a of segment_sums(a), given the gradient of its output:
    a_k is in every [l, s] with s < k <= l, so da_k = sum_{l >= k} sum_{s < k} grad[l, s]."""
    Q = grad.shape[-1]
    below = torch.ones(Q, Q, dtype=torch.bool, device=grad.device).tril(-1)
    row_prefix = grad.cumsum(dim=-1).masked_fill(~below, 0)  # [l, j] = sum_{s <= j} grad[l, s], for j < l
    return F.pad(row_prefix.sum(dim=-2)[..., :-1], (1, 0))  # da_k from column j = k - 1


class _Chunks:
    """The geometry of one call: (batch, length, ...) tensors to (batch, chunk, group, ...) and back."""

    def __init__(self, x, B, chunk_size):
        self.batch, self.length, self.nheads, self.headdim = x.shape
        self.ngroups, self.d_state = B.shape[2], B.shape[3]
        self.per_group = self.nheads // self.ngroups
        self.Q = min(chunk_size, self.length)
        self.n_chunks = -(-self.length // self.Q)
        self.pad = self.n_chunks * self.Q - self.length

    def split(self, t, *inner):
        """(b, L, ...) -> (b, c, Q, ...), padded at the end with zeros (a = 0, xdt = 0: padding
        steps leave the state as it was)."""
        t = F.pad(t, (0, 0) * (t.ndim - 2) + (0, self.pad)) if self.pad else t
        return t.reshape(self.batch, self.n_chunks, self.Q, *inner)

    def heads(self, t):
        """(b, L, nheads[, p]) -> (b, c, g, h, Q[, p])."""
        t = self.split(t, self.ngroups, self.per_group, *t.shape[3:])
        return t.permute(0, 1, 3, 4, 2, *range(5, t.ndim))

    def groups(self, t):
        """(b, L, ngroups, n) -> (b, c, g, Q, n)."""
        return self.split(t, self.ngroups, self.d_state).transpose(2, 3)

    def unheads(self, t):
        """(b, c, g, h, Q[, p]) -> (b, L, nheads[, p])."""
        t = t.permute(0, 1, 4, 2, 3, *range(5, t.ndim))
        return t.reshape(self.batch, self.n_chunks * self.Q, self.nheads, *t.shape[5:])[:, :self.length]

    def ungroups(self, t):
        """(b, c, g, Q, n) -> (b, L, ngroups, n)."""
        return t.transpose(2, 3).reshape(self.batch, self.n_chunks * self.Q, self.ngroups, self.d_state)[:, :self.length]

    def inputs(self, x, dt, A, B, C, document_starts):
        """Chunk-layout a (b, c, g, h, Q), xdt (b, c, g, h, Q, p), B and C (b, c, g, Q, n)."""
        a = dt * A
        if document_starts is not None:
            a = a.masked_fill(document_starts[:, :, None], -math.inf)
        return self.heads(a), self.heads(x * dt[..., None]), self.groups(B), self.groups(C)


def _decays(a):
    """L = exp(segsum(a)) (b, c, g, h, Q, Q); exp(a_0 + ... + a_l) (b, c, g, h, Q)."""
    return torch.exp(segment_sums(a)), torch.exp(a.cumsum(dim=-1))


class SSDChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, initial_state, document_starts, chunk_size):
        geo = _Chunks(x, B, chunk_size)
        a, xdt, B_c, C_c = geo.inputs(x, dt, A, B, C, document_starts)
        L, from_start = _decays(a)
        CB = C_c @ B_c.mT  # (b, c, g, Q, Q), shared by the heads of a group
        y = (CB[:, :, :, None] * L) @ xdt

        # each chunk's own state at its end, then the states entering each chunk
        chunk_states = torch.einsum("bcghq,bcghqp,bcgqn->bcghpn", L[..., -1, :], xdt, B_c)
        chunk_decay = from_start[..., -1]
        state = (x.new_zeros(geo.batch, geo.ngroups, geo.per_group, geo.headdim, geo.d_state) if initial_state is None
                 else initial_state.reshape(geo.batch, geo.ngroups, geo.per_group, geo.headdim, geo.d_state))
        entering = []
        for k in range(geo.n_chunks):
            entering.append(state)
            state = chunk_decay[:, k, ..., None, None] * state + chunk_states[:, k]
        entering = torch.stack(entering, dim=1)  # (b, c, g, h, p, n)

        y = y + torch.einsum("bcgqn,bcghpn->bcghqp", C_c, entering) * from_start[..., None]
        ctx.save_for_backward(x, dt, A, B, C, document_starts, entering)
        ctx.chunk_size, ctx.has_initial = chunk_size, initial_state is not None
        return geo.unheads(y), state.reshape(geo.batch, geo.nheads, geo.headdim, geo.d_state)

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        x, dt, A, B, C, document_starts, entering = ctx.saved_tensors
        geo = _Chunks(x, B, ctx.chunk_size)
        a, xdt, B_c, C_c = geo.inputs(x, dt, A, B, C, document_starts)
        L, from_start = _decays(a)
        CB = C_c @ B_c.mT
        to_end = L[..., -1, :]
        gy = geo.heads(torch.zeros_like(x) if grad_y is None else grad_y)  # (b, c, g, h, Q, p)

        # Y_off = exp(cumsum a) * (C . E)
        gy_E = torch.einsum("bcghqp,bcghpn->bcghqn", gy, entering)
        grad_C = torch.einsum("bcghqn,bcghq->bcgqn", gy_E, from_start)
        grad_from_start = torch.einsum("bcghqn,bcgqn->bcghq", gy_E, C_c)
        grad_entering = torch.einsum("bcghqp,bcghq,bcgqn->bcghpn", gy, from_start, C_c)

        # the recurrence over chunks, backwards: state_{k+1} = decay_k * state_k + S_k
        chunk_decay = from_start[..., -1]
        carried = (grad_last.reshape(geo.batch, geo.ngroups, geo.per_group, geo.headdim, geo.d_state)
                   if grad_last is not None else torch.zeros_like(entering[:, 0]))
        grad_states, grad_decay = [], []
        for k in range(geo.n_chunks - 1, -1, -1):
            grad_states.append(carried)
            grad_decay.append((carried * entering[:, k]).sum((-1, -2)))
            carried = chunk_decay[:, k, ..., None, None] * carried + grad_entering[:, k]
        grad_states = torch.stack(grad_states[::-1], dim=1)  # (b, c, g, h, p, n)
        grad_from_start[..., -1] += torch.stack(grad_decay[::-1], dim=1)

        # S = sum_s to_end_s * outer(xdt_s, B_s)
        B_gS = torch.einsum("bcgqn,bcghpn->bcghqp", B_c, grad_states)
        grad_xdt = B_gS * to_end[..., None]
        grad_to_end = (B_gS * xdt).sum(-1)
        grad_B = torch.einsum("bcghq,bcghqp,bcghpn->bcgqn", to_end, xdt, grad_states)

        # Y_diag = (CB * L) @ xdt
        grad_M = gy @ xdt.mT  # (b, c, g, h, Q, Q)
        grad_xdt = grad_xdt + (CB[:, :, :, None] * L).mT @ gy
        grad_CB = (grad_M * L).sum(3)
        grad_C = grad_C + grad_CB @ B_c
        grad_B = grad_B + grad_CB.mT @ C_c
        grad_L = grad_M * CB[:, :, :, None]
        grad_L[..., -1, :] += grad_to_end

        # L = exp(segsum a), from_start = exp(cumsum a)
        grad_a = segment_sums_backward(grad_L * L)
        grad_cumsum = grad_from_start * from_start
        grad_a = grad_a + grad_cumsum.flip(-1).cumsum(-1).flip(-1)

        grad_a, grad_xdt = geo.unheads(grad_a), geo.unheads(grad_xdt)
        if document_starts is not None:
            grad_a = grad_a.masked_fill(document_starts[:, :, None], 0)
        grad_x = grad_xdt * dt[..., None]
        grad_dt = (grad_xdt * x).sum(-1) + grad_a * A
        grad_A = (grad_a * dt).sum((0, 1))
        grad_h0 = carried.reshape(geo.batch, geo.nheads, geo.headdim, geo.d_state) if ctx.has_initial else None
        return grad_x, grad_dt, grad_A, geo.ungroups(grad_B), geo.ungroups(grad_C), grad_h0, None, None


def ssd_chunked(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=None, initial_state=None,
                document_starts=None, chunk_size=256):
    """The SSD scan with the reference's arguments and results (ops/ssd_reference.py)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_c = x.to(compute)
    dt_c = prepare_dt(dt, dt_bias, dt_softplus, dt_limit, compute)
    h0 = None if initial_state is None else initial_state.to(compute)
    y, last_state = SSDChunked.apply(x_c, dt_c, A.to(compute), B.to(compute), C.to(compute), h0, document_starts,
                                     chunk_size)
    if D is not None:
        D_c = D.to(compute)
        y = y + x_c * (D_c[:, None] if D_c.ndim == 1 else D_c)
    return y.to(x.dtype), last_state
