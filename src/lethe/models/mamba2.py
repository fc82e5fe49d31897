"""Mamba-2 language model: a stack of pre-norm Mamba-2 mixer blocks, optionally each with a
SwiGLU MLP (`d_intermediate` > 0), as the reference's Mamba-2 LMs allow."""

from collections.abc import Sequence

from lethe.errors import is_number, require, require_int, require_positive
from lethe.models.lm import LanguageModel, constructor_args
from lethe.modules import Block, Mamba2Mixer, SwiGLU
from lethe.ops import SSD_IMPL_CHOICES


def _require_range(key: str, value, low_ok, what: str) -> tuple[float, float]:
    """A [low, high] pair of numbers with low_ok(low) and low <= high."""
    ok = isinstance(value, list) and len(value) == 2 and all(is_number(v) for v in value)
    require(ok and low_ok(value[0]) and value[0] <= value[1], key, value, what)
    return float(value[0]), float(value[1])


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
        # checkpoints record plain lists, whether a tuple, a list or an OmegaConf ListConfig came in
        # (so init_from and resume compare equal, and no OmegaConf object is pickled)
        A_init_range, dt_limit = (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
                                  for v in (A_init_range, dt_limit))
        config = constructor_args(locals())
        self.validate_common(vocab_size, d_model, n_layer, norm_eps, pad_vocab_multiple)
        for key, value in (("d_state", d_state), ("d_conv", d_conv), ("expand", expand), ("headdim", headdim),
                           ("ngroups", ngroups), ("chunk_size", chunk_size)):
            require_int(f"model.{key}", value)
        d_inner = expand * d_model
        require(d_inner % headdim == 0, "model.headdim", headdim,
                f"a divisor of d_inner = expand * d_model = {d_inner} (nheads = d_inner / headdim)")
        nheads = d_inner // headdim
        require(nheads % ngroups == 0, "model.ngroups", ngroups, f"a divisor of nheads = d_inner / headdim = {nheads}")
        A_init_range = _require_range("model.A_init_range", A_init_range, lambda low: low > 0, "[low, high] with 0 < low <= high")
        if dt_limit is not None:
            dt_limit = _require_range("model.dt_limit", dt_limit, lambda low: low >= 0,
                                      "null (no clamp) or [min, max] with 0 <= min <= max (.inf for no upper bound)")
        require_positive("model.dt_min", dt_min)
        require_positive("model.dt_max", dt_max)
        require(dt_min <= dt_max, "model.dt_min", dt_min, f"<= model.dt_max={dt_max}")
        require(is_number(dt_init_floor) and dt_init_floor >= 0, "model.dt_init_floor", dt_init_floor, "a number >= 0")
        require(isinstance(d_intermediate, int) and d_intermediate >= 0, "model.d_intermediate", d_intermediate,
                "0 (no MLP) or the SwiGLU hidden width")
        require(scan_impl in SSD_IMPL_CHOICES, "model.scan_impl", scan_impl, f"one of {', '.join(SSD_IMPL_CHOICES)}")

        # the mixer's output writes into the residual stream, and the MLP's when there is one
        self.residual_projections = ("out_proj.weight", "down_proj.weight") if d_intermediate else ("out_proj.weight",)
        self.n_residuals_per_layer = 2 if d_intermediate else 1
        blocks = [
            Block(
                d_model,
                Mamba2Mixer(
                    d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, ngroups=ngroups,
                    A_init_range=A_init_range, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
                    dt_limit=dt_limit, D_has_hdim=D_has_hdim, conv_bias=conv_bias, bias=bias, norm_eps=norm_eps,
                    chunk_size=chunk_size, scan_impl=scan_impl,
                ),
                SwiGLU(d_model, d_intermediate) if d_intermediate else None,
                norm_eps=norm_eps,
                residual_in_fp32=residual_in_fp32,
            )
            for _ in range(n_layer)
        ]
        super().__init__(config, blocks, vocab_size, d_model, norm_eps, pad_vocab_multiple)
