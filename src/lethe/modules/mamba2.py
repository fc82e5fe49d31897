"""The Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs"), one per layer.

    z, xBC, dt = in_proj(u)                     one projection: gate, SSM input with B and C, step sizes
    x, B, C    = silu(causal_conv1d(xBC))       the short convolution runs over x, B and C together
    y          = ssd(x; dt, A, B, C) + D * x    per head: H_t = exp(dt_t A) H_{t-1} + dt_t outer(x_t, B_t),
                                                y_t = H_t C_t; dt = softplus(dt + dt_bias), A a scalar per head
    out        = out_proj(rmsnorm(y * silu(z)))

Against Mamba-1: A is one scalar per head (not a matrix per channel), dt is one step per head,
B and C are shared by all heads of a group and come out of in_proj directly (no x_proj/dt_proj),
and the state is larger (d_state 128). The scan is then mostly matrix multiplies (ops/ssd.py).

With a `MambaState` the mixer runs recurrently exactly like Mamba-1's: the conv window over xBC
and the SSM state (batch, nheads, headdim, d_state); a prompt is prefilled in one parallel pass,
then each token is the same code at length 1.
"""

import torch
from torch import nn

from lethe.modules.mamba import MambaState, inverse_softplus_dt
from lethe.modules.norm import GatedRMSNorm
from lethe.ops import causal_conv1d, ssd_scan


class Mamba2Mixer(nn.Module):
    kind = "Mamba-2"

    def extra_repr(self) -> str:
        return f"d_state {self.d_state}, {self.nheads} heads of {self.headdim}"

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] | None = None,
        D_has_hdim: bool = False,
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 256,
        scan_impl: str = "auto",
    ):
        super().__init__()
        self.d_inner = d_inner = expand * d_model
        self.d_state, self.headdim, self.ngroups = d_state, headdim, ngroups
        self.nheads = nheads = d_inner // headdim
        self.dt_limit = None if dt_limit is None else tuple(dt_limit)
        self.chunk_size, self.scan_impl = chunk_size, scan_impl
        self.conv_dim = d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + nheads, bias=bias)  # [z, xBC, dt]
        # nn.Conv1d for its (conv_dim, 1, d_conv) parameters and default init; the op pads causally
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=conv_bias)

        # dt = softplus(dt_raw + dt_bias), the bias set so that dt starts log-uniform in [dt_min, dt_max]
        self.dt_bias = nn.Parameter(inverse_softplus_dt(nheads, dt_min, dt_max, dt_init_floor))
        # A = -exp(A_log), one per head, drawn uniformly in A_init_range (the reference's init)
        self.A_log = nn.Parameter(torch.log(torch.empty(nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(d_inner if D_has_hdim else nheads))
        for p in (self.dt_bias, self.A_log, self.D):  # decay would pull A toward -1, D toward 0
            p._no_weight_decay = True

        self.norm = GatedRMSNorm(d_inner, group_size=d_inner // ngroups, eps=norm_eps)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def empty_state(self, batch_size: int, max_length: int) -> MambaState:
        """A state for recurrent decoding; its size does not depend on max_length."""
        return MambaState()

    def forward(self, hidden, state: MambaState | None = None, document_starts=None):
        """hidden: (batch, length, d_model) -> (batch, length, d_model). With `state`, continue
        from it and leave the state after the last token in it. With `document_starts` (batch,
        length) bool, the conv window and the SSM state restart empty at every document start."""
        batch, length, _ = hidden.shape
        z, xBC, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        if state is None:
            xBC = causal_conv1d(xBC.mT, weight, bias, "silu", document_starts=document_starts)
        else:
            xBC, conv_state = causal_conv1d(xBC.mT, weight, bias, "silu", initial_states=state.conv,
                                            return_final_states=True, document_starts=document_starts)
        x, B, C = xBC.mT.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)

        # A, D and dt_bias are fp32 parameters (autocast leaves exp alone); the op computes in fp32.
        A = -torch.exp(self.A_log)
        D = self.D.view(self.nheads, self.headdim) if self.D.numel() == self.d_inner else self.D
        y, ssm_state = ssd_scan(
            x.reshape(batch, length, self.nheads, self.headdim), dt, A,
            B.reshape(batch, length, self.ngroups, self.d_state), C.reshape(batch, length, self.ngroups, self.d_state),
            D=D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
            initial_state=None if state is None else state.ssm, impl=self.scan_impl,
            document_starts=document_starts, chunk_size=self.chunk_size,
        )
        if state is not None:
            state.update(conv_state, ssm_state)
        return self.out_proj(self.norm(y.reshape(batch, length, self.d_inner), z))

