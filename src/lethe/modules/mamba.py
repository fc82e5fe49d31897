"""The Mamba mixer (Gu & Dao 2023, "selective SSM" block), one per layer.

    x, z  = in_proj(u)                          expand d_model -> 2 * d_inner
    x     = silu(causal_conv1d(x))              short depthwise convolution, width d_conv
    dt, B, C = x_proj(x)                        the input-dependent ("selective") SSM parameters
    delta = softplus(dt_proj(dt) + dt_bias)     per-channel step size
    y     = scan(x; delta, A, B, C) + D * x     h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t,
                                                y_t = C_t h_t
    out   = out_proj(y * silu(z))

With a `MambaState` the mixer runs recurrently: it starts from the state's convolution window
and SSM state, and leaves the ones after its last token there. A prompt is prefilled in one
parallel pass; each decoding step is the same code at length 1, O(1) time and memory per token.

`selective` switches each of delta, B, C between input-dependent (computed from x by x_proj)
and a learned constant; with all three off the layer is a linear time-invariant S4D-like SSM
(the paper's Table 7 ablation). The scan, D skip, softplus and gate run inside
`lethe.ops.selective_scan`.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lethe.ops import causal_conv1d, selective_scan

ALL_SELECTIVE = {"delta": True, "B": True, "C": True}


@dataclass
class MambaState:
    """One layer's recurrent state: what a Mamba (1 or 2) layer remembers of everything it has read.

    conv: (batch, conv channels, d_conv - 1), the last inputs of the short convolution
    ssm:  h_t of the scan, float32: (batch, d_inner, d_state) in Mamba-1,
          (batch, nheads, headdim, d_state) in Mamba-2
    Both are None until the first segment (zeros, i.e. an empty history); later segments
    update them in place, so their storage stays fixed (what a CUDA graph replay needs).
    """

    conv: torch.Tensor | None = None
    ssm: torch.Tensor | None = None
    fixed_size: ClassVar[bool] = True  # the same tensors for the whole generation (CUDA graphs)

    def update(self, conv, ssm):
        if self.conv is None:
            self.conv, self.ssm = conv, ssm
        else:
            self.conv.copy_(conv)
            self.ssm.copy_(ssm)


def inverse_softplus_dt(d_inner: int, dt_min: float, dt_max: float, dt_init_floor: float):
    """Bias whose softplus is a step size sampled log-uniformly in [dt_min, dt_max] per channel."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt) = log(exp(dt) - 1), computed stably


def resolve_dt_rank(d_model: int, dt_rank: int | str) -> int:
    """The rank of delta's low-rank projection: "auto" is the paper's ceil(d_model / 16)."""
    return math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)


def project(weight, bias, x):
    """weight (out, in) @ x (batch, in, length) -> (batch, out, length): a linear layer on the
    channel-major layout (a batched GEMM of the shared weight; x may be a transposed view)."""
    out = torch.matmul(weight.expand(x.shape[0], -1, -1), x)
    return out if bias is None else out + bias[:, None]


class MambaMixer(nn.Module):
    kind = "Mamba"  # how a model's layer summary names it (LanguageModel.describe_layers)

    def extra_repr(self) -> str:
        return f"d_state {self.d_state}, d_inner {self.d_inner}"

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        selective: dict | None = None,
        scan_impl: str = "auto",
    ):
        super().__init__()
        self.d_inner = d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = resolve_dt_rank(d_model, dt_rank)
        self.selective = {**ALL_SELECTIVE, **(selective or {})}
        self.scan_impl = scan_impl

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        # nn.Conv1d only for its parameters, shape (d_inner, 1, d_conv) like the official
        # checkpoints, and its default init (the official one); the op does the causal padding.
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=conv_bias)

        # x_proj only produces the selective parts: (dt_rank if delta) + (d_state if B) + (d_state if C).
        self.x_proj_sizes = {
            "delta": self.dt_rank if self.selective["delta"] else 0,
            "B": d_state if self.selective["B"] else 0,
            "C": d_state if self.selective["C"] else 0,
        }
        x_proj_out = sum(self.x_proj_sizes.values())
        self.x_proj = nn.Linear(d_inner, x_proj_out, bias=False) if x_proj_out else None

        # delta = softplus(dt_proj(dt) + bias). The bias carries the paper's step-size init and is
        # kept out of the generic "zero every Linear bias" init (_no_reinit). Without selective
        # delta only that bias remains: delta_t = softplus(dt_bias), constant in time.
        dt_bias = inverse_softplus_dt(d_inner, dt_min, dt_max, dt_init_floor)
        if self.selective["delta"]:
            self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
            bound = self.dt_rank**-0.5  # dt_init="random", dt_scale=1
            nn.init.uniform_(self.dt_proj.weight, -bound, bound)
            with torch.no_grad():
                self.dt_proj.bias.copy_(dt_bias)
            self.dt_bias = None
        else:
            self.dt_proj = None
            self.dt_bias = nn.Parameter(dt_bias)
        self.delta_bias._no_reinit = True

        # Constant B and C for the non-selective case. The scan shares B and C across channels
        # (shape (batch, d_state, length)), so a constant one is a (d_state,) vector broadcast
        # over batch and time; channels still differ through their own A and delta. Init as in
        # S4D: B = 1 and C ~ N(0, 1), so the initial kernel is a sum of the d_state decaying
        # exponentials exp(-n * delta * t) with random signed weights, a well-scaled EMA mixture.
        self.B = None if self.selective["B"] else nn.Parameter(torch.ones(d_state))
        self.C = None if self.selective["C"] else nn.Parameter(torch.randn(d_state))

        # S4D-real: A = -(1, 2, ..., d_state) for every channel, stored as log so A stays negative.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))
        # SSM parameters are not weight-decayed: decay would pull A toward -1 and D toward 0.
        for p in (self.A_log, self.D, self.B, self.C):
            if p is not None:
                p._no_weight_decay = True

        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    @property
    def delta_bias(self):
        return self.dt_proj.bias if self.dt_proj is not None else self.dt_bias

    def empty_state(self, batch_size: int, max_length: int) -> MambaState:
        """A state for recurrent decoding; its size does not depend on max_length."""
        return MambaState()

    def forward(self, hidden, state: MambaState | None = None, document_starts=None):
        """hidden: (batch, length, d_model) -> (batch, length, d_model). With `state`, continue
        from it and leave the state after the last token in it. With `document_starts` (batch,
        length) bool, the conv window and the SSM state restart empty at every document start.

        Inside, every tensor is channel-major, (batch, channels, length): the layout of the conv
        and scan kernels. Each projection is a matmul oriented to read and write that layout
        directly (W @ x^T and its transposes are strided operands a GEMM takes as they are), so
        no transpose is copied in the forward or the backward."""
        x, z = (project(w, b, hidden.mT) for w, b in zip(self.in_proj.weight.chunk(2), self._in_proj_biases()))
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        if state is None:
            x = causal_conv1d(x, weight, bias, activation="silu", document_starts=document_starts)
            y, _ = self.ssm(x, z, document_starts=document_starts)
        else:
            x, conv_state = causal_conv1d(x, weight, bias, "silu", initial_states=state.conv, return_final_states=True,
                                          document_starts=document_starts)
            y, ssm_state = self.ssm(x, z, initial_state=state.ssm, document_starts=document_starts)
            state.update(conv_state, ssm_state)
        out = torch.matmul(y.mT, self.out_proj.weight.mT.expand(y.shape[0], -1, -1))  # (batch, length, d_model)
        return out if self.out_proj.bias is None else out + self.out_proj.bias

    def _in_proj_biases(self):
        return (None, None) if self.in_proj.bias is None else self.in_proj.bias.chunk(2)

    def ssm(self, x, z=None, initial_state=None, document_starts=None):
        """The SSM on the convolved signal x (batch, d_inner, length): y = scan(x) + D * x, times
        silu(z) when z is given. With nothing selective this is a fixed causal convolution of x.
        Returns y and the last state (batch, d_inner, d_state)."""
        batch, _, length = x.shape
        parts = {}
        if self.x_proj is not None:
            projected = project(self.x_proj.weight, None, x)  # (batch, x_proj_out, length)
            names = [name for name, size in self.x_proj_sizes.items() if size]
            parts = dict(zip(names, projected.split([self.x_proj_sizes[n] for n in names], dim=1)))

        # dt_proj's bias is added (and softplus applied) inside the scan, in fp32.
        delta = project(self.dt_proj.weight, None, parts["delta"]) if "delta" in parts else torch.zeros_like(x)
        B = parts["B"] if "B" in parts else self.B[None, :, None].expand(batch, -1, length)
        C = parts["C"] if "C" in parts else self.C[None, :, None].expand(batch, -1, length)

        # A_log, D and the dt bias are fp32 parameters (autocast leaves exp alone); the op does
        # all its math in fp32 whatever the dtype of x.
        A = -torch.exp(self.A_log)
        return selective_scan(
            x, delta, A, B, C, D=self.D, z=z, delta_bias=self.delta_bias, delta_softplus=True,
            initial_state=initial_state, impl=self.scan_impl, document_starts=document_starts,
        )
