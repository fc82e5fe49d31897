"""The Mamba-2 layer and model: the mixer against a hand computation, its init, weight-decay
groups, the gated norm, causality, the optional MLP, autocast and config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import CPU_SSD_IMPLS, FLOAT64_SSD_IMPLS, model_config
from lethe.config import instantiate
from lethe.errors import ConfigError
from lethe.models import Mamba2LM
from lethe.modules import GatedRMSNorm, Mamba2Mixer

BYTE_VOCAB = 257


def small_mamba2(**kwargs):
    return Mamba2LM(**{"vocab_size": 61, "d_model": 16, "n_layer": 2, "d_state": 4, "headdim": 8, "chunk_size": 8, **kwargs})


def mixer_by_hand(mixer, u):
    """The layer written out from the paper's equations with plain loops, for float64 inputs."""
    batch, length, _ = u.shape
    d_inner, n, p, g = mixer.d_inner, mixer.d_state, mixer.headdim, mixer.ngroups
    heads, width = mixer.nheads, mixer.conv1d.weight.shape[-1]
    projected = u @ mixer.in_proj.weight.T
    z, xBC, dt = projected[..., :d_inner], projected[..., d_inner:-heads], projected[..., -heads:]
    padded = torch.cat([xBC.new_zeros(batch, width - 1, xBC.shape[-1]), xBC], dim=1)
    conv = sum(padded[:, k:k + length] * mixer.conv1d.weight[:, 0, k] for k in range(width)) + mixer.conv1d.bias
    xBC = conv * torch.sigmoid(conv)
    x = xBC[..., :d_inner].reshape(batch, length, heads, p)
    B = xBC[..., d_inner:d_inner + g * n].reshape(batch, length, g, n)
    C = xBC[..., d_inner + g * n:].reshape(batch, length, g, n)
    dt = F.softplus(dt + mixer.dt_bias)
    A = -torch.exp(mixer.A_log)
    D = mixer.D.reshape(heads, -1)  # (heads, 1) or (heads, headdim)
    y = torch.zeros(batch, length, heads, p, dtype=u.dtype)
    for b in range(batch):
        for h in range(heads):
            group = h // (heads // g)
            state = torch.zeros(p, n, dtype=u.dtype)
            for t in range(length):
                state = torch.exp(dt[b, t, h] * A[h]) * state + dt[b, t, h] * torch.outer(x[b, t, h], B[b, t, group])
                y[b, t, h] = state @ C[b, t, group] + D[h] * x[b, t, h]
    gated = y.reshape(batch, length, d_inner) * z * torch.sigmoid(z)
    grouped = gated.reshape(batch, length, g, d_inner // g)
    normed = grouped / torch.sqrt(grouped.pow(2).mean(-1, keepdim=True) + mixer.norm.eps)
    return (normed.reshape(batch, length, d_inner) * mixer.norm.weight) @ mixer.out_proj.weight.T


@pytest.mark.parametrize("impl", FLOAT64_SSD_IMPLS)
@pytest.mark.parametrize("ngroups,D_has_hdim", [(1, False), (2, True)])
def test_mixer_matches_hand_computation(impl, ngroups, D_has_hdim):
    torch.manual_seed(2)
    mixer = Mamba2Mixer(12, d_state=5, d_conv=3, headdim=6, ngroups=ngroups, D_has_hdim=D_has_hdim, chunk_size=4,
                        scan_impl=impl).double()
    with torch.no_grad():  # off their structured init, so each parameter matters
        for param in (mixer.D, mixer.conv1d.bias, mixer.norm.weight):
            param.normal_()
    u = torch.randn(2, 11, 12, dtype=torch.float64)
    torch.testing.assert_close(mixer(u), mixer_by_hand(mixer, u), rtol=1e-9, atol=1e-10)


def test_init_follows_the_reference():
    torch.manual_seed(3)
    mixer = Mamba2Mixer(256, d_state=16, headdim=8, dt_min=1e-3, dt_max=1e-1)  # 64 heads
    A = -torch.exp(mixer.A_log)
    assert mixer.nheads == 64 and A.shape == (64,) and A.dtype == torch.float32
    assert (A <= -1).all() and (A >= -16).all() and A.std() > 2  # log U(1, 16), spread over the range
    dt = F.softplus(mixer.dt_bias)
    assert (dt >= 1e-3 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    assert dt.log().std() > 0.8  # log-uniform over two decades has std ln(100) / sqrt(12) = 1.33
    assert torch.equal(mixer.D, torch.ones(64)) and torch.equal(mixer.norm.weight, torch.ones(512))
    assert mixer.in_proj.weight.shape == (2 * 512 + 2 * 16 + 64, 256) and mixer.conv1d.weight.shape == (512 + 32, 1, 4)


def test_weight_decay_spares_the_ssm_parameters_and_norms():
    model = small_mamba2(d_intermediate=24)
    groups = model.param_groups(weight_decay=0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {name for name, p in model.named_parameters() if id(p) not in decayed}
    for layer in range(2):
        for name in ("A_log", "D", "dt_bias", "norm.weight", "conv1d.bias"):
            assert f"layers.{layer}.mixer.{name}" in names
    decayed_names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert {"layers.0.mixer.in_proj.weight", "layers.0.mixer.out_proj.weight", "layers.0.mlp.down_proj.weight"} <= decayed_names


def test_gated_norm_normalizes_each_group_of_the_gated_signal():
    torch.manual_seed(4)
    norm = GatedRMSNorm(8, group_size=4, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x, z = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    gated = (x * z * torch.sigmoid(z)).reshape(3, 2, 4)
    expected = (gated / gated.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).reshape(3, 8) * norm.weight.double()
    torch.testing.assert_close(norm.double()(x, z), expected)


@pytest.mark.parametrize("impl", CPU_SSD_IMPLS)
def test_logits_are_causal(impl):
    torch.manual_seed(5)
    model = small_mamba2(scan_impl=impl)
    tokens = torch.randint(0, 61, (2, 40))
    changed_tokens = tokens.clone()
    changed_tokens[:, 23] = (tokens[:, 23] + 1) % 61
    with torch.no_grad():
        before, after = model(tokens), model(changed_tokens)
    torch.testing.assert_close(after[:, :23], before[:, :23], rtol=0, atol=1e-6)
    assert ((after[:, 23:] - before[:, 23:]).abs().amax(-1) > 1e-7).all()


def test_mlp_blocks_and_their_residual_scale():
    torch.manual_seed(7)
    n_layer = 16
    with_mlp, without = small_mamba2(n_layer=n_layer, d_intermediate=48), small_mamba2(n_layer=n_layer)
    assert all(layer.mlp is not None for layer in with_mlp.layers) and all(layer.mlp is None for layer in without.layers)
    bound = 1 / math.sqrt(32)  # out_proj's fan-in d_inner: kaiming-uniform's bound
    for model, residuals in ((with_mlp, 2), (without, 1)):
        stds = torch.stack([layer.mixer.out_proj.weight.std() for layer in model.layers])
        expected = bound / math.sqrt(3) / math.sqrt(residuals * n_layer)
        assert abs(stds.mean().item() / expected - 1) < 0.05
    assert with_mlp.num_params() - without.num_params() == n_layer * (3 * 16 * 48 + 16)


def test_bf16_autocast_keeps_residual_and_logits_fp32():
    torch.manual_seed(6)
    model = instantiate(model_config("mamba2-tiny"), vocab_size=BYTE_VOCAB, _convert_="all")
    tokens = torch.randint(0, BYTE_VOCAB, (2, 48))
    with torch.no_grad():
        reference = model(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # A_log, D, dt_bias stay fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


BAD_CONFIGS = [
    ({"headdim": 5}, "headdim", "a divisor of d_inner"),
    ({"ngroups": 3}, "ngroups", "a divisor of nheads"),
    ({"chunk_size": 0}, "chunk_size", ""),
    ({"d_state": 0}, "d_state", ""),
    ({"d_intermediate": -1}, "d_intermediate", ""),
    ({"dt_limit": [0.1, 0.01]}, "dt_limit", "0 <= min <= max"),
    ({"dt_limit": 0.1}, "dt_limit", ""),
    ({"A_init_range": [0, 16]}, "A_init_range", "0 < low"),
    ({"scan_impl": "fused"}, "scan_impl", "one of"),
    ({"dt_min": 0.5}, "dt_min", "dt_max"),
]


@pytest.mark.parametrize("override,key,hint", BAD_CONFIGS, ids=[k for _, k, _ in BAD_CONFIGS])
def test_bad_config_raises_one_line_naming_the_key(override, key, hint):
    with pytest.raises(ConfigError) as err:
        small_mamba2(**override)
    message = str(err.value)
    assert f"model.{key}" in message and hint in message and "\n" not in message


def test_dt_limit_reaches_the_scan():
    torch.manual_seed(8)
    tokens = torch.randint(0, 61, (1, 20))
    free = small_mamba2()
    clamped = small_mamba2(dt_limit=[0.0, 1e-4])  # hardly any step: the SSM output is almost D * x
    clamped.load_state_dict(free.state_dict())
    with torch.no_grad():
        assert (free(tokens) - clamped(tokens)).abs().max() > 1e-4


def test_a_config_instantiated_without_conversion_records_plain_lists():
    """hydra's instantiate without _convert_ passes ListConfig values: they are accepted and
    recorded as lists (checkpoint metadata holds no OmegaConf objects)."""
    from hydra.utils import instantiate as hydra_instantiate
    from omegaconf import OmegaConf

    config = OmegaConf.create({**model_config("mamba2-tiny"), "dt_limit": [0.0, 0.5]})
    with torch.device("meta"):
        model = hydra_instantiate(config, vocab_size=BYTE_VOCAB)
    assert model.config["A_init_range"] == [1.0, 16.0] and type(model.config["A_init_range"]) is list
    assert model.config["dt_limit"] == [0.0, 0.5] and type(model.config["dt_limit"]) is list
