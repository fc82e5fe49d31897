"""Mamba-2's state-space dual (SSD) scan as one sequential loop: the ground truth every faster
implementation is tested against, self-contained (nothing of the dispatcher or the others in it).

Per head h (headdim P, d_state N; B and C shared by the heads of a group), one step per token,
in float32 (float64 for float64 inputs, for gradcheck):

    dt_t = clamp(softplus(dt_t + dt_bias), dt_limit)
    H_t  = exp(dt_t * A_h) * H_{t-1} + dt_t * outer(x_t, B_t)      (P, N); H_{t-1} = 0 where a document starts
    y_t  = H_t @ C_t + D_h * x_t

Gradients come from autograd. It is slow by design: clarity over speed.
"""

import torch
import torch.nn.functional as F


def prepare_dt(dt, dt_bias, dt_softplus, dt_limit, compute):
    """The step size every implementation scans with: (dt + bias), softplus, clamped, in `compute`."""
    dt = dt.to(compute)
    if dt_bias is not None:
        dt = dt + dt_bias.to(compute)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit is not None:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def ssd_scan_ref(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=None, initial_state=None,
                 document_starts=None):
    """x: (batch, length, nheads, headdim); dt: (batch, length, nheads); A: (nheads,); B, C:
    (batch, length, ngroups, d_state); D: (nheads,) or (nheads, headdim); dt_bias: (nheads,);
    dt_limit: (min, max) or None; initial_state: (batch, nheads, headdim, d_state);
    document_starts: (batch, length) bool, true where a document starts.

    Returns y (batch, length, nheads, headdim) in x's dtype and the last state (batch, nheads,
    headdim, d_state) in the compute dtype (float32, or float64 for float64 inputs).
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, length, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]
    x_c, A_c = x.to(compute), A.to(compute)
    B_c = B.to(compute).repeat_interleave(heads_per_group, dim=2)  # (batch, length, nheads, d_state)
    C_c = C.to(compute).repeat_interleave(heads_per_group, dim=2)
    dt_c = prepare_dt(dt, dt_bias, dt_softplus, dt_limit, compute)
    h = x_c.new_zeros(batch, nheads, headdim, B.shape[-1]) if initial_state is None else initial_state.to(compute)
    keep = x_c.new_ones(batch, length) if document_starts is None else 1 - document_starts.to(compute)
    ys = []
    for t in range(length):
        decay = torch.exp(dt_c[:, t] * A_c) * keep[:, t, None]  # (batch, nheads)
        h = decay[:, :, None, None] * h + (dt_c[:, t, :, None] * x_c[:, t])[..., None] * B_c[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C_c[:, t]))
    y = torch.stack(ys, dim=1) if ys else x_c.new_zeros(x.shape)
    if D is not None:
        D_c = D.to(compute)
        y = y + x_c * (D_c[:, None] if D_c.ndim == 1 else D_c)
    return y.to(x.dtype), h
