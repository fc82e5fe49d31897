"""Parameter-matched baselines: for any model config the model of another family with (nearly)
the same parameter count, so a comparison never rests on a hand-tuned pair.

    SSM (Mamba, Mamba-2) -> Transformer++: half the layers (a Transformer layer ~ two Mamba
        layers, as in the paper), the same d_model, heads of 64 (at least 2), the SwiGLU d_ff solved.
    Transformer++ -> SSM: twice the layers, d_model solved.
    SSM -> the other SSM: the same layers, d_model solved.
    Any -> a hybrid (settings.pattern, its layer stack): d_model solved; a hybrid as the reference
        counts each of its letters as an SSM layer (a Transformer++ layer ~ two of them).
    Mamba-2's d_model moves in whole heads; where that step is too coarse for the tolerance, the
    layer count nearest the default that lands within it is taken (and reported).

The matched model takes its family's defaults, plus `settings` (e.g. a smaller d_state for a
tiny Mamba-2). Parameters are counted by building the candidate on the meta device (no memory,
no init cost), so the count is the model's own, tied embedding included, at the run's vocabulary.
"""

import math

import torch
from hydra.utils import get_class

from lethe.config import instantiate
from lethe.errors import ConfigError
from lethe.models.hybrid import HybridLM, parse_pattern
from lethe.models.lm import layer_args, model_target, plain
from lethe.models.mamba import MambaLM
from lethe.models.mamba2 import Mamba2LM
from lethe.models.transformer import TransformerLM
from lethe.modules import Mamba2Mixer

FAMILIES = {"mamba": MambaLM, "mamba2": Mamba2LM, "transformer": TransformerLM, "hybrid": HybridLM}
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


def _mamba2_unit(mamba2: dict, multiple: int) -> int:
    """A multiple of `multiple` that keeps Mamba-2's heads whole (headdim divides expand * d_model)
    and its groups whole (ngroups divides nheads)."""
    a = layer_args(Mamba2Mixer, mamba2)
    per_head = a["headdim"] * a["ngroups"]
    return math.lcm(multiple, per_head // math.gcd(a["expand"], per_head))


def _width_unit(cls, settings: dict, multiple: int) -> int:
    """The step of the solved d_model: whole Mamba-2 heads and groups, whole attention heads of
    an even size (RoPE)."""
    if cls is Mamba2LM:
        return _mamba2_unit(settings, multiple)
    if cls is not HybridLM:
        return multiple
    unit = _mamba2_unit(settings.get("mamba2", {}), multiple) if "M" in settings["pattern"] else multiple
    return math.lcm(unit, 2 * settings["attention"]["n_head"]) if "*" in settings["pattern"] else unit


def layer_count(cfg: dict) -> int:
    """A model's layers: n_layer, or a hybrid's letters."""
    return len(parse_pattern(cfg["pattern"])) if "pattern" in cfg else cfg["n_layer"]


def _hybrid_settings(reference: dict, settings: dict) -> dict:
    """The matched hybrid's fixed keys: its pattern (required) and, for attention, heads of about
    64 at the reference's width unless settings.attention.n_head says otherwise."""
    if "pattern" not in settings:
        raise ConfigError("baseline.family=hybrid needs the stack to match: baseline.settings={pattern: MM*M} (any layer pattern)")
    attention = {"n_head": max(2, reference["d_model"] // 64), **settings.get("attention", {})}
    return {**settings, "pattern": parse_pattern(settings["pattern"]), "attention": attention}


def matched_transformer(ssm: dict, vocab_size: int, multiple: int, settings: dict) -> dict:
    d_model = ssm["d_model"]
    n_head = settings.get("n_head", max(2, d_model // 64))
    while d_model % n_head or (d_model // n_head) % 2:  # RoPE needs an even head dim
        n_head -= 1
    base = {"_target_": model_target(TransformerLM), "d_model": d_model, "n_layer": max(1, layer_count(ssm) // 2),
            **{k: ssm[k] for k in SHARED_KEYS if k in ssm}, **settings, "n_head": n_head}
    target = count_params(ssm, vocab_size)
    return _solve(lambda units: {**base, "d_ff": units * multiple}, 1, 16 * d_model // multiple, target, vocab_size)


def default_ssm_layers(reference: dict) -> int:
    """An SSM's layer count against `reference`: twice a Transformer's (two SSM layers ~ one
    attention + MLP layer), an SSM's own, a hybrid's letters."""
    return 2 * reference["n_layer"] if get_class(reference["_target_"]) is TransformerLM else layer_count(reference)


def matched_ssm(reference: dict, cls, vocab_size: int, multiple: int, settings: dict, tolerance: float) -> dict:
    """d_model solved at the default layer count; when Mamba-2's coarse width step (whole heads)
    cannot land within tolerance there, the nearest layer counts are tried too."""
    base = {"_target_": model_target(cls), **{k: reference[k] for k in SHARED_KEYS if k in reference}, **settings}
    unit = _width_unit(cls, settings, multiple)
    target = count_params(reference, vocab_size)
    if cls is HybridLM:
        return _matched_hybrid(reference, base, unit, multiple, target, vocab_size)
    n_layer = default_ssm_layers(reference)

    def solve(layers):
        return _solve(lambda units: {**base, "n_layer": layers, "d_model": units * unit}, 1,
                      4 * reference["d_model"] // unit + 1, target, vocab_size)

    def gap(cfg):
        return abs(count_params(cfg, vocab_size) - target) / target

    best = solve(n_layer)
    for layers in (n_layer - 1, n_layer + 1, n_layer - 2, n_layer + 2):
        if gap(best) <= tolerance:
            break
        if layers >= 1:
            best = min(best, solve(layers), key=gap)
    return best


def _matched_hybrid(reference: dict, base: dict, unit: int, multiple: int, target: int, vocab_size: int) -> dict:
    """The pattern fixes the layers: d_model is solved, or, when the pattern has MLP layers whose
    d_ff is not fixed, d_ff at the reference's width (a finer step); the closer of the two."""
    candidates = [_solve(lambda units: {**base, "d_model": units * unit}, 1, 4 * reference["d_model"] // unit + 1,
                         target, vocab_size)]
    mlp = base.get("mlp", {})
    if "-" in base["pattern"] and "d_ff" not in mlp:
        d_model = max(unit, round(reference["d_model"] / unit) * unit)
        candidates.append(_solve(lambda units: {**base, "d_model": d_model, "mlp": {**mlp, "d_ff": units * multiple}},
                                 1, 16 * d_model // multiple, target, vocab_size))
    return min(candidates, key=lambda cfg: abs(count_params(cfg, vocab_size) - target))


class MatchedBaseline:
    """The `baseline` config group: turns the configured model into its parameter-matched
    counterpart of another family, refusing a gap larger than `tolerance`."""

    def __init__(self, tolerance: float = 0.02, multiple: int = 8, family: str | None = None, settings: dict | None = None):
        """tolerance: largest allowed |params - reference| / reference; multiple: the solved
        width (d_ff or d_model) is a multiple of this (8 keeps matmuls on tensor-core tiles);
        family: mamba | mamba2 | transformer | hybrid, or null for the other kind (an SSM's or a
        hybrid's Transformer++, a Transformer's Mamba); settings: fixed keys of the matched model
        (its family's defaults otherwise; a hybrid's pattern is required)."""
        if not 0 < tolerance < 1 or multiple < 1:
            raise ConfigError(f"baseline.tolerance={tolerance} must be in (0, 1) and baseline.multiple={multiple} >= 1")
        if family is not None and family not in FAMILIES:
            raise ConfigError(f"baseline.family={family!r} is not one of {', '.join(FAMILIES)} (or null: the other kind)")
        self.tolerance, self.multiple, self.family, self.settings = tolerance, multiple, family, plain(settings or {})

    def __call__(self, model_cfg: dict, vocab_size: int) -> tuple[dict, dict]:
        """(the matched model config, a report: reference/matched parameters and the gap)."""
        target = model_cfg.get("_target_")
        reference = get_class(target) if target else None
        if reference not in FAMILIES.values():
            raise ConfigError(f"baseline=matched needs model=mamba-*, mamba2-*, transformer-* or a hybrid, not {target}")
        matched_cls = FAMILIES[self.family] if self.family else (MambaLM if reference is TransformerLM else TransformerLM)
        settings = _hybrid_settings(model_cfg, self.settings) if matched_cls is HybridLM else self.settings
        if matched_cls is reference and matched_cls is not HybridLM:  # a hybrid may match another pattern
            raise ConfigError(f"baseline.family={self.family} is the configured model's own family; "
                              "pick another (mamba, mamba2, transformer, hybrid)")
        if matched_cls is TransformerLM:
            matched = matched_transformer(model_cfg, vocab_size, self.multiple, settings)
        else:
            matched = matched_ssm(model_cfg, matched_cls, vocab_size, self.multiple, settings, self.tolerance)
        params, reference_params = count_params(matched, vocab_size), count_params(model_cfg, vocab_size)
        gap = (params - reference_params) / reference_params
        if abs(gap) > self.tolerance:
            raise ConfigError(f"the closest matched {matched_cls.__name__} has {params:,} parameters, "
                              f"{gap:+.1%} from the reference {reference_params:,} (baseline.tolerance={self.tolerance}); "
                              "lower baseline.multiple, set baseline.settings or raise the tolerance")
        report = {"reference_model": reference.__name__, "reference_params": reference_params, "matched_params": params,
                  "gap": round(gap, 5), "solved": self._solved(model_cfg, matched)}
        return matched, report

    def _solved(self, reference: dict, matched: dict) -> str:
        if "d_ff" in matched and get_class(matched["_target_"]) is TransformerLM:
            return "d_ff"
        if "d_ff" in matched.get("mlp", {}) and "d_ff" not in self.settings.get("mlp", {}):
            return "d_ff"
        return "d_model" if layer_count(matched) == default_ssm_layers(reference) or "pattern" in matched else "d_model and n_layer"


def describe(report: dict) -> str:
    return (f"matched to {report['reference_model']} ({report['reference_params']:,} parameters): "
            f"{report['matched_params']:,} ({report['gap']:+.2%}, {report['solved']} solved)")

