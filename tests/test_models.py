"""The language models: sizes against the paper, causality, init, weight-decay groups, configs."""

import math

import hydra
import pytest
import torch

from helpers import CPU_SCAN_IMPLS, compose_config, model_config
from lethe.errors import ConfigError
from lethe.models import MambaLM, TransformerLM

NEOX_VOCAB = 50280  # GPT-NeoX tokenizer, the paper's
BYTE_VOCAB = 257  # conf/tokenizer/byte.yaml: 256 bytes + <|endoftext|>

# the paper's nominal sizes (Mamba, Table 3 / Transformer++ baselines of the scaling laws)
PAPER_SIZES = {
    "mamba-130m": 130e6, "mamba-370m": 370e6, "mamba-790m": 790e6, "mamba-1.4b": 1.4e9,
    "transformer-125m": 125e6, "transformer-350m": 350e6, "transformer-760m": 760e6, "transformer-1.3b": 1.3e9,
}


def from_yaml(name, vocab_size, **overrides):
    """The model a run builds from model=<name> (its family's base config composed in)."""
    return hydra.utils.instantiate(model_config(name), vocab_size=vocab_size, _convert_="all", **overrides)


def small_mamba(**kwargs):
    return MambaLM(**{"vocab_size": 61, "d_model": 16, "n_layer": 2, "d_state": 4, **kwargs})


def small_transformer(**kwargs):
    return TransformerLM(**{"vocab_size": 61, "d_model": 32, "n_layer": 2, "n_head": 4, "max_seq_len": 64, **kwargs})


# ---- sizes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PAPER_SIZES)
def test_paper_sizes_match_their_parameter_counts(name):
    with torch.device("meta"):  # no memory, no init cost: 1.4B parameters in milliseconds
        model = from_yaml(name, NEOX_VOCAB)
    assert model.padded_vocab_size == NEOX_VOCAB  # already a multiple of 8
    assert abs(model.num_params() / PAPER_SIZES[name] - 1) < 0.10, f"{name}: {model.num_params():,}"


def test_tiny_pair_is_parameter_matched_at_the_byte_vocab():
    mamba, transformer = from_yaml("mamba-tiny", BYTE_VOCAB), from_yaml("transformer-tiny", BYTE_VOCAB)
    assert mamba.padded_vocab_size == transformer.padded_vocab_size == 264
    assert abs(transformer.num_params() / mamba.num_params() - 1) < 0.05
    # the counts quoted in the yaml comments
    assert (mamba.num_params(), transformer.num_params()) == (500_352, 509_568)


def test_num_params_counts_tied_embedding_once():
    model = small_mamba()
    assert model.lm_head.weight is model.embedding.weight
    unique = {id(p): p.numel() for m in model.modules() for p in m.parameters(recurse=False)}
    assert model.num_params() == sum(unique.values())
    assert model.num_params(exclude_embedding=True) == model.num_params() - 64 * 16  # 61 padded to 64


# ---- forward -----------------------------------------------------------------------------------
CAUSAL_MODELS = [("mamba", impl) for impl in CPU_SCAN_IMPLS] + [("transformer", None)]


@pytest.mark.parametrize("kind,impl", CAUSAL_MODELS)
def test_logits_are_causal(kind, impl):
    torch.manual_seed(5)
    model = small_mamba(scan_impl=impl) if kind == "mamba" else small_transformer()
    tokens = torch.randint(0, 61, (2, 40))
    perturbed = tokens.clone()
    t = 23
    perturbed[:, t] = (tokens[:, t] + 1) % 61
    with torch.no_grad():
        before, after = model(tokens), model(perturbed)
    assert before.shape == (2, 40, 64) and before.dtype == torch.float32
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    changed = (after[:, t:] - before[:, t:]).abs().amax(-1)  # (batch, positions >= t)
    assert (changed > 1e-7).all(), "the perturbed token must influence its own and every later position"


def test_transformer_rejects_inputs_longer_than_max_seq_len():
    model = small_transformer(max_seq_len=16)
    model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"model\.max_seq_len=16") as err:
        model(torch.zeros(1, 17, dtype=torch.long))
    assert "\n" not in str(err.value) and isinstance(err.value, ConfigError)


@pytest.mark.parametrize("name", ["mamba-tiny", "transformer-tiny"])
def test_bf16_autocast_keeps_residual_and_logits_fp32(name):
    torch.manual_seed(6)
    model = from_yaml(name, BYTE_VOCAB)
    tokens = torch.randint(0, BYTE_VOCAB, (2, 48))
    residual_dtypes = []
    for layer in model.layers:
        layer.register_forward_hook(lambda module, args, out: residual_dtypes.append(out.dtype))
    with torch.no_grad():
        reference = model(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert residual_dtypes == [torch.float32] * (2 * len(model.layers))
    # bf16 matmuls change the logits a little, not their meaning
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens).logsumexp(-1).mean().backward()  # and the backward runs
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- init and weight-decay groups --------------------------------------------------------------
def kaiming_uniform_std(fan_in):
    return 1 / math.sqrt(3 * fan_in)  # nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))


def test_output_projections_are_rescaled_by_depth():
    torch.manual_seed(7)
    n_layer = 16
    mamba = MambaLM(vocab_size=100, d_model=64, n_layer=n_layer, bias=True)
    for layer in mamba.layers:
        mixer = layer.mixer
        out_std = mixer.out_proj.weight.std().item()
        expected = kaiming_uniform_std(mixer.d_inner) / math.sqrt(n_layer)
        assert abs(out_std / expected - 1) < 0.05
        assert abs(mixer.in_proj.weight.std().item() / kaiming_uniform_std(64) - 1) < 0.05  # not rescaled
        assert torch.equal(mixer.in_proj.bias, torch.zeros_like(mixer.in_proj.bias))  # Linear biases zero
        assert mixer.dt_proj.bias.abs().min() > 0  # except the dt bias
    assert abs(mamba.embedding.weight.std().item() / 0.02 - 1) < 0.05

    transformer = TransformerLM(vocab_size=100, d_model=128, n_layer=n_layer, n_head=2, d_ff=256)
    scale = math.sqrt(2 * n_layer)  # attention and MLP both write into the residual stream
    for layer in transformer.layers:
        assert abs(layer.mixer.o_proj.weight.std().item() / (kaiming_uniform_std(128) / scale) - 1) < 0.05
        assert abs(layer.mlp.down_proj.weight.std().item() / (kaiming_uniform_std(256) / scale) - 1) < 0.05
        assert abs(layer.mixer.qkv_proj.weight.std().item() / kaiming_uniform_std(128) - 1) < 0.05


@pytest.mark.parametrize("selective", [{"delta": True, "B": True, "C": True}, {"delta": False, "B": False, "C": False}])
def test_param_groups_split_decay_and_no_decay(selective):
    model = small_mamba(selective=selective)
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # each once, tied head once

    names = {id(p): name for name, p in model.named_parameters()}
    no_decay_names = {names[id(p)].split(".")[-1] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    mixer_params = {"A_log", "D", "bias", "weight"}  # bias: conv1d/dt; weight: the RMSNorms
    if not selective["B"]:
        mixer_params |= {"B", "C", "dt_bias"}
    assert no_decay_names == mixer_params
    assert all(p.ndim < 2 or names[id(p)].endswith("A_log") for p in no_decay["params"])
    assert "embedding.weight" in decay_names and "layers.0.mixer.in_proj.weight" in decay_names


def test_transformer_has_no_biases_and_decays_only_matrices():
    model = small_transformer()
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())
    decay, no_decay = model.param_groups(0.1)
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 2 * 2 + 1  # two norms per layer and the final norm


def test_config_rebuilds_the_same_model():
    for model in (small_mamba(selective={"delta": True, "B": False, "C": True}), small_transformer(d_ff=96)):
        clone = type(model)(**model.config)
        clone.load_state_dict(model.state_dict())
        tokens = torch.randint(0, 61, (1, 12))
        assert torch.equal(clone(tokens), model(tokens))
        assert model.config["vocab_size"] == model.vocab_size == 61 and model.padded_vocab_size == 64


def test_yaml_selective_becomes_plain_dict():
    cfg = compose_config("model=mamba-tiny").model
    cfg.selective.delta = False
    model = hydra.utils.instantiate(cfg, vocab_size=BYTE_VOCAB)  # without _convert_: a DictConfig arrives
    assert model.config["selective"] == {"delta": False, "B": True, "C": True}
    assert type(model.config["selective"]) is dict


# ---- config validation -------------------------------------------------------------------------
BAD_CONFIGS = [
    (small_mamba, {"vocab_size": 0}, "vocab_size"),
    (small_mamba, {"d_model": 0}, "d_model"),
    (small_mamba, {"n_layer": 0}, "n_layer"),
    (small_mamba, {"d_state": 0}, "d_state"),
    (small_mamba, {"d_conv": 0}, "d_conv"),
    (small_mamba, {"expand": 0}, "expand"),
    (small_mamba, {"expand": 1.5}, "expand"),
    (small_mamba, {"dt_rank": 0}, "dt_rank"),
    (small_mamba, {"dt_rank": "big"}, "dt_rank"),
    (small_mamba, {"dt_min": 0.0}, "dt_min"),
    (small_mamba, {"dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
    (small_mamba, {"dt_init_floor": -1.0}, "dt_init_floor"),
    (small_mamba, {"scan_impl": "fused"}, "scan_impl"),
    (small_mamba, {"selective": {"delta": "yes"}}, "selective.delta"),
    (small_mamba, {"selective": {"A": True}}, "selective.A"),
    (small_mamba, {"selective": True}, "selective"),
    (small_mamba, {"norm_eps": 0}, "norm_eps"),
    (small_mamba, {"pad_vocab_multiple": 0}, "pad_vocab_multiple"),
    (small_transformer, {"n_head": 3}, "n_head"),
    (small_transformer, {"n_head": 0}, "n_head"),
    (small_transformer, {"n_head": 32}, "n_head"),  # head dim 1: RoPE needs pairs
    (small_transformer, {"d_ff": 0}, "d_ff"),
    (small_transformer, {"max_seq_len": 0}, "max_seq_len"),
    (small_transformer, {"rope_theta": -1.0}, "rope_theta"),
    (small_transformer, {"d_model": -8}, "d_model"),
]


@pytest.mark.parametrize("build,override,key", BAD_CONFIGS, ids=[f"{b.__name__}-{k}-{v!r}" for b, v, k in BAD_CONFIGS])
def test_bad_config_raises_config_error_naming_the_key(build, override, key):
    with pytest.raises(ConfigError) as err:
        build(**override)
    message = str(err.value)
    assert f"model.{key}" in message and "\n" not in message
