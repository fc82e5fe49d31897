"""Mamba language model: a stack of pre-norm Mamba mixer blocks (no MLP), as in the paper."""

from collections.abc import Mapping

from lethe.errors import ConfigError, is_int, is_number, require, require_int, require_positive
from lethe.models.lm import LanguageModel, constructor_args
from lethe.modules import Block, MambaMixer
from lethe.modules.mamba import ALL_SELECTIVE
from lethe.ops import SCAN_IMPL_CHOICES


def normalize_selective(selective) -> dict:
    """{"delta": bool, "B": bool, "C": bool}; missing keys default to selective (True)."""
    if selective is None:
        return dict(ALL_SELECTIVE)
    require(isinstance(selective, Mapping), "model.selective", selective, "a mapping like {delta: true, B: true, C: true}")
    for key, value in selective.items():
        if key not in ALL_SELECTIVE:
            raise ConfigError(f"model.selective.{key} is not a selectivity switch; the switches are delta, B, C")
        require(isinstance(value, bool), f"model.selective.{key}", value, "true or false")
    return {**ALL_SELECTIVE, **selective}


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
        require_int("model.d_state", d_state)
        require_int("model.d_conv", d_conv)
        require_int("model.expand", expand)
        require(dt_rank == "auto" or is_int(dt_rank), "model.dt_rank", dt_rank, '"auto" (ceil(d_model / 16)) or an integer >= 1')
        require_positive("model.dt_min", dt_min)
        require_positive("model.dt_max", dt_max)
        require(dt_min <= dt_max, "model.dt_min", dt_min, f"<= model.dt_max={dt_max}")
        require(is_number(dt_init_floor) and dt_init_floor >= 0, "model.dt_init_floor", dt_init_floor, "a number >= 0")
        require(scan_impl in SCAN_IMPL_CHOICES, "model.scan_impl", scan_impl, f"one of {', '.join(SCAN_IMPL_CHOICES)}")

        blocks = [
            Block(
                d_model,
                MambaMixer(
                    d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
                    dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
                    conv_bias=conv_bias, bias=bias, selective=selective, scan_impl=scan_impl,
                ),
                norm_eps=norm_eps,
                residual_in_fp32=residual_in_fp32,
            )
            for _ in range(n_layer)
        ]
        super().__init__(config, blocks, vocab_size, d_model, norm_eps, pad_vocab_multiple)
