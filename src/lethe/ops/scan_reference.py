"""The selective scan as one sequential loop: the ground truth every faster implementation is
tested against, self-contained (nothing of the dispatcher or the other implementations in it).

Exactly the paper's recurrence, one step per time step, in float32 (float64 when the inputs are
float64, for gradcheck), with softplus, the delta bias, the D skip and the SiLU gate written out:

    delta_t = softplus(delta_t + delta_bias)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t       (h_{t-1} = 0 where a document starts)
    y_t     = (<C_t, h_t> + D * u_t) * silu(z_t)

Gradients come from autograd. It is slow by design: clarity over speed.
"""

import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, initial_state=None,
                       document_starts=None):
    """u, delta, z: (batch, channels, length); A: (channels, d_state); B, C: (batch, d_state,
    length); D, delta_bias: (channels,); initial_state: (batch, channels, d_state); document_starts:
    (batch, length), true where a document starts (the state before that step is dropped).

    Returns y (batch, channels, length) in u's dtype and the last state (batch, channels,
    d_state) in the compute dtype (float32, or float64 for float64 inputs).
    """
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u_c, delta_c, A_c, B_c, C_c = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    batch, channels, _ = u.shape
    h = u_c.new_zeros(batch, channels, A.shape[1]) if initial_state is None else initial_state.to(compute)
    keep = u_c.new_ones(batch, u.shape[-1]) if document_starts is None else 1 - document_starts.to(compute)  # (batch, length)
    ys = []
    for u_t, delta_t, B_t, C_t, keep_t in zip(u_c.unbind(-1), delta_c.unbind(-1), B_c.unbind(-1), C_c.unbind(-1), keep.unbind(-1)):
        decay = torch.exp(delta_t[:, :, None] * A_c) * keep_t[:, None, None]  # (batch, channels, d_state)
        h = decay * h + (delta_t * u_t)[:, :, None] * B_t[:, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u_c * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(u.dtype), h
