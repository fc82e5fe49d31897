"""Mamba-2 language model: a stack of pre-norm Mamba-2 mixer blocks, optionally each with a
SwiGLU MLP (`d_intermediate` > 0), as the reference's Mamba-2 LMs allow.

`mamba2_mixer` checks one layer's settings and builds it: Mamba2LM stacks it n_layer times, a
hybrid (lethe.models.hybrid) wherever its pattern says `M`.
"""

from lethe.errors import is_number, require, require_int, require_positive
from lethe.models.lm import LanguageModel, constructor_args, layer_args, layer_settings, plain
from lethe.models.mamba import require_dt_init
from lethe.modules import Block, Mamba2Mixer, SwiGLU
from lethe.ops import SSD_IMPL_CHOICES


def _require_range(key: str, value, low_ok, what: str) -> tuple[float, float]:
    """A [low, high] pair of numbers with low_ok(low) and low <= high."""
    value = plain(value)
    ok = isinstance(value, list) and len(value) == 2 and all(is_number(v) for v in value)
    require(ok and low_ok(value[0]) and value[0] <= value[1], key, value, what)
    return float(value[0]), float(value[1])


def mamba2_mixer(d_model: int, prefix: str = "model", **settings) -> Mamba2Mixer:
    """One Mamba-2 layer's mixer from its settings (Mamba2Mixer's keywords, defaults for the rest);
    a setting out of range is a ConfigError naming `prefix`.<key>."""
    a = layer_args(Mamba2Mixer, settings)
    for key in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
        require_int(f"{prefix}.{key}", a[key])
    d_inner = a["expand"] * d_model
    require(d_inner % a["headdim"] == 0, f"{prefix}.headdim", a["headdim"],
            f"a divisor of d_inner = expand * d_model = {d_inner} (nheads = d_inner / headdim)")
    nheads = d_inner // a["headdim"]
    require(nheads % a["ngroups"] == 0, f"{prefix}.ngroups", a["ngroups"], f"a divisor of nheads = d_inner / headdim = {nheads}")
    a["A_init_range"] = _require_range(f"{prefix}.A_init_range", a["A_init_range"], lambda low: low > 0,
                                       "[low, high] with 0 < low <= high")
    if a["dt_limit"] is not None:
        a["dt_limit"] = _require_range(f"{prefix}.dt_limit", a["dt_limit"], lambda low: low >= 0,
                                       "null (no clamp) or [min, max] with 0 <= min <= max (.inf for no upper bound)")
    require_dt_init(prefix, a)
    require_positive(f"{prefix}.norm_eps", a["norm_eps"])
    require(a["scan_impl"] in SSD_IMPL_CHOICES, f"{prefix}.scan_impl", a["scan_impl"], f"one of {', '.join(SSD_IMPL_CHOICES)}")
    return Mamba2Mixer(d_model, **a)


class Mamba2LM(LanguageModel):
    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layer: int,
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
        chunk_size: int = 256,
        d_intermediate: int = 0,
        scan_impl: str = "auto",
        norm_eps: float = 1e-5,
        pad_vocab_multiple: int = 8,
        residual_in_fp32: bool = True,
    ):
        A_init_range, dt_limit = plain(A_init_range), plain(dt_limit)
        config = constructor_args(locals())
        self.validate_common(vocab_size, d_model, n_layer, norm_eps, pad_vocab_multiple)
        require(isinstance(d_intermediate, int) and d_intermediate >= 0, "model.d_intermediate", d_intermediate,
                "0 (no MLP) or the SwiGLU hidden width")

        # the mixer's output writes into the residual stream, and the MLP's when there is one
        self.residual_projections = ("out_proj.weight", "down_proj.weight") if d_intermediate else ("out_proj.weight",)
        self.n_residuals_per_layer = 2 if d_intermediate else 1
        settings = layer_settings(Mamba2Mixer, config)
        blocks = [
            Block(d_model, mamba2_mixer(d_model, **settings), SwiGLU(d_model, d_intermediate) if d_intermediate else None,
                  norm_eps=norm_eps, residual_in_fp32=residual_in_fp32)
            for _ in range(n_layer)
        ]
        super().__init__(config, blocks, vocab_size, d_model, norm_eps, pad_vocab_multiple)
