"""Mamba language model: a stack of pre-norm Mamba mixer blocks (no MLP), as in the paper.

`mamba_mixer` checks one layer's settings and builds it: MambaLM stacks it n_layer times, a
hybrid (lethe.models.hybrid) wherever its pattern says `m`.
"""

from collections.abc import Mapping

from lethe.errors import ConfigError, is_int, is_number, require, require_int, require_positive
from lethe.models.lm import LanguageModel, constructor_args, layer_args, layer_settings
from lethe.modules import Block, MambaMixer
from lethe.modules.mamba import ALL_SELECTIVE
from lethe.ops import SCAN_IMPL_CHOICES


def normalize_selective(selective, key: str = "model.selective") -> dict:
    """{"delta": bool, "B": bool, "C": bool}; missing keys default to selective (True)."""
    if selective is None:
        return dict(ALL_SELECTIVE)
    require(isinstance(selective, Mapping), key, selective, "a mapping like {delta: true, B: true, C: true}")
    for switch, value in selective.items():
        if switch not in ALL_SELECTIVE:
            raise ConfigError(f"{key}.{switch} is not a selectivity switch; the switches are delta, B, C")
        require(isinstance(value, bool), f"{key}.{switch}", value, "true or false")
    return {**ALL_SELECTIVE, **selective}


def require_dt_init(prefix: str, a: dict) -> None:
    """The dt initialisation both Mamba families share: dt log-uniform in [dt_min, dt_max], floored."""
    require_positive(f"{prefix}.dt_min", a["dt_min"])
    require_positive(f"{prefix}.dt_max", a["dt_max"])
    require(a["dt_min"] <= a["dt_max"], f"{prefix}.dt_min", a["dt_min"], f"<= {prefix}.dt_max={a['dt_max']}")
    require(is_number(a["dt_init_floor"]) and a["dt_init_floor"] >= 0, f"{prefix}.dt_init_floor", a["dt_init_floor"],
            "a number >= 0")


def mamba_mixer(d_model: int, prefix: str = "model", **settings) -> MambaMixer:
    """One Mamba layer's mixer from its settings (MambaMixer's keywords, defaults for the rest);
    a setting out of range is a ConfigError naming `prefix`.<key>."""
    a = layer_args(MambaMixer, settings)
    require_int(f"{prefix}.d_state", a["d_state"])
    require_int(f"{prefix}.d_conv", a["d_conv"])
    require_int(f"{prefix}.expand", a["expand"])
    require(a["dt_rank"] == "auto" or is_int(a["dt_rank"]), f"{prefix}.dt_rank", a["dt_rank"],
            '"auto" (ceil(d_model / 16)) or an integer >= 1')
    require_dt_init(prefix, a)
    require(a["scan_impl"] in SCAN_IMPL_CHOICES, f"{prefix}.scan_impl", a["scan_impl"], f"one of {', '.join(SCAN_IMPL_CHOICES)}")
    return MambaMixer(d_model, **{**a, "selective": normalize_selective(a["selective"], f"{prefix}.selective")})


class MambaLM(LanguageModel):
    residual_projections = ("out_proj.weight",)
    n_residuals_per_layer = 1

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layer: int,
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
        norm_eps: float = 1e-5,
        pad_vocab_multiple: int = 8,
        residual_in_fp32: bool = True,
    ):
        selective = normalize_selective(selective)
        config = constructor_args(locals())
        self.validate_common(vocab_size, d_model, n_layer, norm_eps, pad_vocab_multiple)
        settings = layer_settings(MambaMixer, config)
        blocks = [Block(d_model, mamba_mixer(d_model, **settings), norm_eps=norm_eps, residual_in_fp32=residual_in_fp32)
                  for _ in range(n_layer)]
        super().__init__(config, blocks, vocab_size, d_model, norm_eps, pad_vocab_multiple)
