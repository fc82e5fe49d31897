"""SwiGLU feed-forward (Shazeer 2020), the MLP of the Transformer++ baseline and of hybrids."""

import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up share one matmul. No biases.

    It also serves as a layer's mixer (a hybrid's `-` layer): it looks at one token at a time, so
    it takes and ignores a decoding state and document starts, and keeps no state."""

    kind = "MLP"

    def extra_repr(self) -> str:
        return f"d_ff {self.down_proj.in_features}"

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def empty_state(self, batch_size: int, max_length: int) -> None:
        return None

    def forward(self, x, state=None, document_starts=None):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
