"""Pre-norm residual block: h <- h + mixer(norm(h)) [+ mlp(norm2(h))], one per layer.

Mamba layers have only the mixer; Transformer layers have attention as the mixer plus an MLP.
The residual stream is kept in fp32 (as in the Mamba paper) so that hundreds of small bf16
updates under autocast do not round away.
"""

import torch
from torch import nn

from lethe.modules.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, d_model: int, mixer: nn.Module, mlp: nn.Module | None = None, norm_eps: float = 1e-5, residual_in_fp32: bool = True):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.norm = RMSNorm(d_model, norm_eps)
        self.mixer = mixer
        self.norm2 = RMSNorm(d_model, norm_eps) if mlp is not None else None
        self.mlp = mlp

    def _add(self, residual, update):
        if self.residual_in_fp32:  # at least fp32: float64 models (gradcheck) stay float64
            dtype = torch.promote_types(update.dtype, torch.float32)
            return residual.to(dtype) + update.to(dtype)
        return residual.to(update.dtype) + update

    def forward(self, h, state=None, document_starts=None):
        """`state`: the mixer's decoding state (Mamba's recurrent state, attention's KV cache);
        `document_starts`: where the packed documents of each row start (lethe.ops.documents)."""
        h = self._add(h, self.mixer(self.norm(h), state, document_starts))
        if self.mlp is not None:
            h = self._add(h, self.mlp(self.norm2(h)))
        return h
