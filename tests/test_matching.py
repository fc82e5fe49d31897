"""baseline=matched: the parameter-matched model of the other family, within 2%, at every size.
Parameter counts are checked against closed-form counts written from the architectures."""

import math

import pytest
from omegaconf import OmegaConf

from lethe.errors import ConfigError
from lethe.models.matching import MatchedBaseline
from lethe.training.run import model_config
from test_training_parts import CONF, compose_train

NEOX_VOCAB = 50280


def padded(vocab, multiple=8):
    return math.ceil(vocab / multiple) * multiple


def transformer_params(c, vocab):
    d, f = c["d_model"], c["d_ff"]
    per_layer = 4 * d * d + 3 * d * f + 2 * d  # qkv + o, gate/up/down, two norms
    return padded(vocab) * d + c["n_layer"] * per_layer + d


def mamba_params(c, vocab):
    d = c["d_model"]
    e, n, k = c.get("expand", 2) * d, c.get("d_state", 16), c.get("d_conv", 4)
    r = math.ceil(d / 16)
    per_layer = d * 2 * e + e * k + e + e * (r + 2 * n) + r * e + e + e * n + e + e * d + d
    return padded(vocab) * d + c["n_layer"] * per_layer + d


def load(name):
    return OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))


@pytest.mark.parametrize("name,vocab", [("mamba-tiny", 257), ("mamba-130m", NEOX_VOCAB), ("mamba-370m", NEOX_VOCAB),
                                        ("transformer-tiny", 257), ("transformer-125m", NEOX_VOCAB),
                                        ("transformer-350m", NEOX_VOCAB)])
def test_matched_model_is_within_two_percent(name, vocab):
    reference = load(name)
    matched, report = MatchedBaseline(tolerance=0.02)(reference, vocab)
    if name.startswith("mamba"):
        assert matched["_target_"] == "lethe.models.TransformerLM" and matched["n_layer"] == reference["n_layer"] // 2
        reference_count, matched_count = mamba_params(reference, vocab), transformer_params(matched, vocab)
    else:
        assert matched["_target_"] == "lethe.models.MambaLM" and matched["n_layer"] == 2 * reference["n_layer"]
        reference_count, matched_count = transformer_params({**reference, "d_ff": reference["d_ff"] or
                                                             64 * math.ceil(8 * reference["d_model"] / 3 / 64)}, vocab), mamba_params(matched, vocab)
    assert (report["reference_params"], report["matched_params"]) == (reference_count, matched_count)
    assert abs(matched_count - reference_count) <= 0.02 * reference_count
    assert report["gap"] == pytest.approx((matched_count - reference_count) / reference_count, abs=1e-5)


def test_baseline_matched_composes_from_the_real_config():
    cfg = compose_train("model=mamba-tiny", "baseline=matched")
    matched, report = model_config(cfg, vocab_size=257)
    assert matched["_target_"] == "lethe.models.TransformerLM" and cfg.run_name == "mamba-tiny-matched"
    assert abs(report["gap"]) < 0.02
    plain, none = model_config(compose_train("model=mamba-tiny"), vocab_size=257)
    assert plain["_target_"] == "lethe.models.MambaLM" and none is None


def test_an_impossible_tolerance_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="baseline.tolerance"):
        MatchedBaseline(tolerance=1e-7)(load("mamba-tiny"), 257)


@pytest.mark.parametrize("experiment", ["paper-125m", "paper-350m"])
def test_paper_presets_compose_with_the_papers_recipe(experiment):
    from lethe.config import validate

    for baseline in ("none", "matched"):
        cfg = compose_train(f"experiment={experiment}", f"baseline={baseline}")
        validate(cfg)
        tokens_per_step = cfg.data.batch_size * cfg.seq_len * cfg.trainer.accumulate_grad_batches
        assert tokens_per_step == 2**19 and cfg.optim.betas == [0.9, 0.95] and cfg.trainer.precision == "bf16-mixed"
        assert cfg.run_name.endswith(baseline)
    assert (cfg.optim.lr, cfg.trainer.max_steps) == {"paper-125m": (6e-4, 4800), "paper-350m": (3e-4, 13500)}[experiment]
