"""Sequential selective scan: the ground truth every faster implementation is tested against.

One step per time step, exactly the recurrence of the paper, in float32 (or float64 when the
inputs are float64, for gradcheck):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = <C_t, h_t>

Gradients come from autograd. It is slow by design: clarity over speed.
"""

import torch


def scan_reference(u, delta, A, B, C, initial_state=None):
    """u, delta: (batch, channels, length); A: (channels, d_state); B, C: (batch, d_state, length).

    `delta` is the discretization step after softplus/bias. Returns y (batch, channels, length)
    and the last state (batch, channels, d_state), both in the compute dtype.
    """
    batch, channels, _ = u.shape
    h = u.new_zeros(batch, channels, A.shape[1]) if initial_state is None else initial_state
    ys = []
    for u_t, delta_t, B_t, C_t in zip(u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1)):
        decay = torch.exp(delta_t[:, :, None] * A)  # (batch, channels, d_state)
        h = decay * h + (delta_t * u_t)[:, :, None] * B_t[:, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))
    return torch.stack(ys, dim=-1), h
