"""Transformer++ baseline of the Mamba paper: RoPE attention + SwiGLU MLP, RMSNorm, no biases.

`attention_mixer` and `swiglu_mlp` check one layer's settings and build it: TransformerLM pairs
them in every layer, a hybrid (lethe.models.hybrid) places them where its pattern says `*`, `-`.
"""

import math

from lethe.errors import require, require_int, require_positive
from lethe.models.lm import LanguageModel, constructor_args, layer_args, layer_settings
from lethe.modules import Block, CausalSelfAttention, SwiGLU
from lethe.modules.attention import ATTENTION_IMPLS


def default_d_ff(d_model: int) -> int:
    """8/3 * d_model (the SwiGLU width with the parameters of a 4x GELU MLP), rounded up to 64."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


def attention_mixer(d_model: int, prefix: str = "model", **settings) -> CausalSelfAttention:
    """One causal RoPE attention layer from its settings (CausalSelfAttention's keywords: n_head,
    rope_theta, attention_impl, window, the last for a sliding window whose KV cache it bounds)."""
    a = layer_args(CausalSelfAttention, settings)
    n_head = a.get("n_head")
    require_int(f"{prefix}.n_head", n_head)
    require(d_model % n_head == 0, f"{prefix}.n_head", n_head, f"a divisor of model.d_model={d_model}")
    require((d_model // n_head) % 2 == 0, f"{prefix}.n_head", n_head, "such that d_model / n_head is even (RoPE rotates pairs)")
    require_positive(f"{prefix}.rope_theta", a["rope_theta"])
    require(a["attention_impl"] in ATTENTION_IMPLS, f"{prefix}.attention_impl", a["attention_impl"],
            f"one of {', '.join(ATTENTION_IMPLS)}")
    if a["window"] is not None:
        require_int(f"{prefix}.window", a["window"])
    return CausalSelfAttention(d_model, **a)


def swiglu_mlp(d_model: int, prefix: str = "model", d_ff: int | None = None) -> SwiGLU:
    """One SwiGLU MLP; d_ff null is default_d_ff(d_model)."""
    if d_ff is not None:
        require_int(f"{prefix}.d_ff", d_ff)
    return SwiGLU(d_model, default_d_ff(d_model) if d_ff is None else d_ff)


class TransformerLM(LanguageModel):
    # attention output and MLP output both write into the residual stream
    residual_projections = ("o_proj.weight", "down_proj.weight")
    n_residuals_per_layer = 2

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layer: int,
        n_head: int,
        d_ff: int | None = None,
        max_seq_len: int = 2048,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        pad_vocab_multiple: int = 8,
        residual_in_fp32: bool = True,
        attention_impl: str = "auto",
    ):
        config = constructor_args(locals())
        self.validate_common(vocab_size, d_model, n_layer, norm_eps, pad_vocab_multiple)
        require_int("model.max_seq_len", max_seq_len)
        attention, mlp = layer_settings(CausalSelfAttention, config), layer_settings(SwiGLU, config)
        blocks = [
            Block(d_model, attention_mixer(d_model, **attention), swiglu_mlp(d_model, **mlp),
                  norm_eps=norm_eps, residual_in_fp32=residual_in_fp32)
            for _ in range(n_layer)
        ]
        super().__init__(config, blocks, vocab_size, d_model, norm_eps, pad_vocab_multiple, max_seq_len=max_seq_len)
