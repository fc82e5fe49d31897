"""Mamba in one file: the whole language model, top to bottom, in plain PyTorch.

This is the page to read first. It computes exactly what Lethe's `MambaLM` computes (the test
`tests/test_minimal_mamba.py` loads the same weights into both and compares logits), without
anything that makes Lethe fast: no fused kernel, no chunked scan, no recurrent decoding state.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * x_t      (per channel, per state)
    y_t = C_t . h_t + D * x_t

An SSM layer is an exponential moving average of a projected input; Mamba makes the forgetting
input-dependent: delta (how much "time" passes, i.e. how much to forget), B and C are computed
from the current token.

    python examples/minimal_mamba.py      # a random model: prints the shape of its logits and a sample
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MambaConfig:
    vocab_size: int = 257  # the byte tokenizer: 256 bytes + <|endoftext|>
    d_model: int = 128
    n_layer: int = 4
    d_state: int = 16  # N: states per channel
    d_conv: int = 4  # width of the short causal convolution
    expand: int = 2  # d_inner = expand * d_model channels inside each block
    pad_vocab_multiple: int = 8
    norm_eps: float = 1e-5

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank(self) -> int:  # delta is computed through a low-rank bottleneck
        return math.ceil(self.d_model / 16)

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_multiple) * self.pad_vocab_multiple


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def selective_scan(x, delta, A, B, C, D):
    """The recurrence, one time step at a time. x, delta: (batch, length, d_inner); A: (d_inner,
    d_state); B, C: (batch, length, d_state); D: (d_inner,). Returns y (batch, length, d_inner)."""
    batch, length, d_inner = x.shape
    h = x.new_zeros(batch, d_inner, A.shape[1])  # the state: what the layer remembers
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, t, :, None] * A)  # (batch, d_inner, d_state), in (0, 1]: forgetting
        h = decay * h + (delta[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))  # read the state out through C
    return torch.stack(ys, dim=1) + x * D


class MambaMixer(nn.Module):
    """One selective-SSM block: expand, convolve, scan with input-dependent delta/B/C, gate, project back."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        d_inner, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner, bias=False)  # the signal x and the gate z
        self.conv1d = nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner, bias=True, padding=cfg.d_conv - 1)
        self.x_proj = nn.Linear(d_inner, r + 2 * n, bias=False)  # delta (low rank), B, C from the token
        self.dt_proj = nn.Linear(r, d_inner, bias=True)
        # A = -(1, 2, ..., N) for every channel (S4D-real), stored as a log so it stays negative
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=False)

    def forward(self, u):  # u: (batch, length, d_model)
        length = u.shape[1]
        x, z = self.in_proj(u).chunk(2, dim=-1)
        # causal: pad d_conv - 1 on both sides, keep the first `length` outputs
        x = F.silu(self.conv1d(x.transpose(1, 2))[:, :, :length].transpose(1, 2))
        dt, B, C = self.x_proj(x).split([self.cfg.dt_rank, self.cfg.d_state, self.cfg.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))  # > 0: how much time passes at this token
        y = selective_scan(x, delta, -torch.exp(self.A_log), B, C, self.D)
        return self.out_proj(y * F.silu(z))


class Block(nn.Module):
    """Pre-norm residual: h + mixer(norm(h)). Mamba blocks have no MLP."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MambaMixer(cfg)

    def forward(self, h):
        return h + self.mixer(self.norm(h))


class Mamba(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight  # tied, as in the paper

    def forward(self, ids):  # ids: (batch, length) -> logits (batch, length, padded vocab)
        h = self.embedding(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm_f(h))

    @torch.no_grad()
    def generate(self, ids, max_new_tokens: int, temperature: float = 1.0, generator=None):
        """Sample one token at a time. This re-reads the whole sequence per token (O(L) each);
        Lethe's generation carries each layer's state instead: O(1) per token."""
        for _ in range(max_new_tokens):
            logits = self(ids)[:, -1, : self.cfg.vocab_size]
            if temperature == 0:
                next_id = logits.argmax(-1, keepdim=True)
            else:
                next_id = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, next_id], dim=1)
        return ids


if __name__ == "__main__":
    torch.manual_seed(0)
    model = Mamba(MambaConfig()).eval()
    prompt = torch.tensor([list(b"def main(")])
    print("logits:", tuple(model(prompt).shape), f"{sum(p.numel() for p in model.parameters()):,} parameters")
    print("sample:", bytes(t for t in model.generate(prompt, 20, temperature=0)[0].tolist() if t < 256))
