"""Parameter-matched baselines: for any Mamba config the Transformer++ with (nearly) the same
parameter count, and the reverse, so a comparison never rests on a hand-tuned pair.

    Mamba -> Transformer++: half the layers (a Transformer layer ~ two Mamba layers, as in the
        paper), the same d_model, heads of 64 (at least 2), and the SwiGLU width d_ff solved.
    Transformer++ -> Mamba: twice the layers, d_model solved.

Parameters are counted by building the candidate on the meta device (no memory, no init cost),
so the count is the model's own, tied embedding included, at the run's vocabulary.
"""

import torch
from hydra.utils import get_class

from lethe.config import instantiate
from lethe.errors import ConfigError
from lethe.models.lm import model_target
from lethe.models.mamba import MambaLM
from lethe.models.transformer import TransformerLM

MAMBA, TRANSFORMER = model_target(MambaLM), model_target(TransformerLM)
SHARED_KEYS = ("norm_eps", "pad_vocab_multiple", "residual_in_fp32")


def count_params(model_cfg: dict, vocab_size: int) -> int:
    with torch.device("meta"):
        return instantiate(model_cfg, vocab_size=vocab_size, _convert_="all").num_params()


def _solve(build, lo: int, hi: int, target: int, vocab_size: int) -> dict:
    """The config build(x) for integer x in [lo, hi] whose parameter count is closest to target
    (the count grows with x: bisect, then take the nearer neighbour)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_params(build(mid), vocab_size) <= target:
            lo = mid
        else:
            hi = mid
    return min((build(lo), build(hi)), key=lambda c: abs(count_params(c, vocab_size) - target))


def matched_transformer(mamba: dict, vocab_size: int, multiple: int) -> dict:
    d_model = mamba["d_model"]
    n_head = max(2, d_model // 64)
    while d_model % n_head or (d_model // n_head) % 2:  # RoPE needs an even head dim
        n_head -= 1
    base = {"_target_": TRANSFORMER, "d_model": d_model, "n_layer": max(1, mamba["n_layer"] // 2), "n_head": n_head,
            **{k: mamba[k] for k in SHARED_KEYS if k in mamba}}
    target = count_params(mamba, vocab_size)
    return _solve(lambda units: {**base, "d_ff": units * multiple}, 1, 16 * d_model // multiple, target, vocab_size)


def matched_mamba(transformer: dict, vocab_size: int, multiple: int) -> dict:
    base = {"_target_": MAMBA, "n_layer": 2 * transformer["n_layer"], **{k: transformer[k] for k in SHARED_KEYS if k in transformer}}
    target = count_params(transformer, vocab_size)
    return _solve(lambda units: {**base, "d_model": units * multiple}, 1, 4 * transformer["d_model"] // multiple, target, vocab_size)


class MatchedBaseline:
    """The `baseline` config group: turns the configured model into its parameter-matched
    counterpart of the other family, refusing a gap larger than `tolerance`."""

    def __init__(self, tolerance: float = 0.02, multiple: int = 8):
        """tolerance: largest allowed |params - reference| / reference; multiple: the solved
        width (d_ff or d_model) is a multiple of this (8 keeps matmuls on tensor-core tiles)."""
        if not 0 < tolerance < 1 or multiple < 1:
            raise ConfigError(f"baseline.tolerance={tolerance} must be in (0, 1) and baseline.multiple={multiple} >= 1")
        self.tolerance, self.multiple = tolerance, multiple

    def __call__(self, model_cfg: dict, vocab_size: int) -> tuple[dict, dict]:
        """(the matched model config, a report: reference/matched parameters and the gap)."""
        target = model_cfg.get("_target_")
        family = get_class(target) if target else None
        if family is MambaLM:
            matched = matched_transformer(model_cfg, vocab_size, self.multiple)
        elif family is TransformerLM:
            matched = matched_mamba(model_cfg, vocab_size, self.multiple)
        else:
            raise ConfigError(f"baseline=matched needs model=mamba-* or transformer-*, not {target}")
        reference, params = count_params(model_cfg, vocab_size), count_params(matched, vocab_size)
        gap = (params - reference) / reference
        if abs(gap) > self.tolerance:
            raise ConfigError(f"the closest matched {matched['_target_'].rsplit('.', 1)[-1]} has {params:,} parameters, "
                              f"{gap:+.1%} from the reference {reference:,} (baseline.tolerance={self.tolerance}); "
                              "lower baseline.multiple or raise the tolerance")
        report = {"reference_model": family.__name__, "reference_params": reference, "matched_params": params,
                  "gap": round(gap, 5), "solved": "d_ff" if family is MambaLM else "d_model"}
        return matched, report


def describe(report: dict) -> str:
    return (f"matched to {report['reference_model']} ({report['reference_params']:,} parameters): "
            f"{report['matched_params']:,} ({report['gap']:+.2%}, {report['solved']} solved)")

