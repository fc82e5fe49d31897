"""baseline=matched: the parameter-matched model of the other family, within 2%, at every size.
Parameter counts are checked against closed-form counts written from the architectures."""

import pytest
from hydra.utils import get_class

from helpers import NEOX_VOCAB, mamba_params, model_config, transformer_params
from lethe.errors import ConfigError
from lethe.models import MambaLM, TransformerLM
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
