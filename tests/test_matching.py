"""baseline=matched: the parameter-matched model of the other family, within 2%, at every size.
Parameter counts are checked against closed-form counts written from the architectures."""

import pytest
from hydra.utils import get_class

from helpers import NEOX_VOCAB, assert_one_line, family_params, mamba_params, model_config, transformer_params
from lethe.errors import ConfigError
from lethe.models import HybridLM, MambaLM, TransformerLM
from lethe.models.matching import MatchedBaseline
from lethe.training.run import model_config as run_model_config


def load(name):
    return model_config(name)


@pytest.mark.parametrize("name,vocab", [("mamba-tiny", 257), ("mamba-130m", NEOX_VOCAB), ("mamba-370m", NEOX_VOCAB),
                                        ("transformer-tiny", 257), ("transformer-125m", NEOX_VOCAB),
                                        ("transformer-350m", NEOX_VOCAB)])
def test_matched_model_is_within_two_percent(name, vocab):
    reference = load(name)
    matched, report = MatchedBaseline(tolerance=0.02)(reference, vocab)
    if name.startswith("mamba"):
        assert get_class(matched["_target_"]) is TransformerLM and matched["n_layer"] == reference["n_layer"] // 2
        reference_count, matched_count = mamba_params(reference, vocab), transformer_params(matched, vocab)
    else:
        assert get_class(matched["_target_"]) is MambaLM and matched["n_layer"] == 2 * reference["n_layer"]
        reference_count, matched_count = transformer_params(reference, vocab), mamba_params(matched, vocab)
    assert (report["reference_params"], report["matched_params"]) == (reference_count, matched_count)
    assert abs(matched_count - reference_count) <= 0.02 * reference_count
    assert report["gap"] == pytest.approx((matched_count - reference_count) / reference_count, abs=1e-5)


def test_baseline_matched_composes_from_the_real_config(compose_train):
    cfg = compose_train("model=mamba-tiny", "baseline=matched")
    matched, report = run_model_config(cfg, vocab_size=257)
    assert get_class(matched["_target_"]) is TransformerLM and cfg.run_name == "mamba-tiny-matched"
    assert abs(report["gap"]) < 0.02
    plain, none = run_model_config(compose_train("model=mamba-tiny"), vocab_size=257)
    assert plain["_target_"] == "lethe.models.MambaLM" and get_class(plain["_target_"]) is MambaLM and none is None


def test_an_impossible_tolerance_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="baseline.tolerance"):
        MatchedBaseline(tolerance=1e-7)(load("mamba-tiny"), 257)


@pytest.mark.parametrize("experiment", ["paper-125m", "paper-350m"])
def test_paper_presets_compose_with_the_papers_recipe(experiment, compose_train):
    from lethe.config import validate

    for baseline in ("none", "matched"):
        cfg = compose_train(f"experiment={experiment}", f"baseline={baseline}")
        validate(cfg)
        tokens_per_step = cfg.data.batch_size * cfg.seq_len * cfg.trainer.accumulate_grad_batches
        assert tokens_per_step == 2**19 and cfg.optim.betas == [0.9, 0.95] and cfg.trainer.precision == "bf16-mixed"
        assert cfg.run_name.endswith(baseline)
    assert (cfg.optim.lr, cfg.trainer.max_steps) == {"paper-125m": (6e-4, 4800), "paper-350m": (3e-4, 13500)}[experiment]


# ---- hybrids: a pattern as the reference, or as the matched stack --------------------------------
@pytest.mark.parametrize("name,family,settings,vocab", [
    ("hybrid-tiny", None, {}, 257),
    ("hybrid-tiny", "mamba2", {"d_state": 64, "headdim": 32}, 257),
    ("hybrid-tiny", "mamba", {}, 257),
    ("mamba2-hybrid-130m", None, {}, NEOX_VOCAB),
    ("transformer-tiny", "hybrid", {"pattern": "MM*M", "mamba2": {"headdim": 32}}, 257),
    ("mamba-tiny", "hybrid", {"pattern": "m-*-"}, 257),
    ("transformer-125m", "hybrid", {"pattern": "M-M-M-*-" * 3}, NEOX_VOCAB),
])
def test_patterns_match_within_two_percent(name, family, settings, vocab):
    reference = load(name)
    matched, report = MatchedBaseline(tolerance=0.02, family=family, settings=settings)(reference, vocab)
    reference_count, matched_count = family_params(reference, vocab), family_params(matched, vocab)
    assert (report["reference_params"], report["matched_params"]) == (reference_count, matched_count)
    assert abs(matched_count - reference_count) <= 0.02 * reference_count
    cls = get_class(matched["_target_"])
    if family is None:  # a hybrid's Transformer++: half its letters, d_ff solved
        assert cls is TransformerLM and matched["n_layer"] == len(reference["pattern"]) // 2 and report["solved"] == "d_ff"
    elif family == "hybrid":
        assert cls is HybridLM and matched["pattern"] == settings["pattern"]
        # a stack with MLP layers solves their d_ff at the reference's width; one without, d_model
        if "-" in settings["pattern"]:
            assert report["solved"] == "d_ff" and matched["d_model"] == reference["d_model"]
        else:
            assert report["solved"] == "d_model" and matched["d_model"] % 16 == 0  # whole heads of 32
    else:  # an SSM against a hybrid: as many layers as its letters
        assert matched["n_layer"] == len(reference["pattern"])


def test_a_matched_hybrid_needs_its_pattern():
    with pytest.raises(ConfigError) as info:
        MatchedBaseline(family="hybrid")(load("mamba-tiny"), 257)
    assert_one_line(info, "baseline.family=hybrid", "baseline.settings={pattern: MM*M}")
    with pytest.raises(ConfigError) as info:
        MatchedBaseline(family="hybrid", settings={"pattern": "MQ"})(load("mamba-tiny"), 257)
    assert_one_line(info, "'Q' at layer 1")


def test_baseline_matched_composes_a_hybrid_from_the_real_config(compose_train):
    cfg = compose_train("model=transformer-tiny", "baseline=matched", "baseline.family=hybrid",
                        "baseline.settings={pattern: MM*M, mamba2: {headdim: 32}}")
    matched, report = run_model_config(cfg, vocab_size=257)
    assert get_class(matched["_target_"]) is HybridLM and matched["pattern"] == "MM*M" and abs(report["gap"]) < 0.02
