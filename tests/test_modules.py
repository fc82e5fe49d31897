"""The layers against independent formulas: RMSNorm, RoPE, causal attention, the Mamba mixer."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import FLOAT64_SCAN_IMPLS
from lethe.modules import CausalSelfAttention, MambaMixer, RMSNorm, apply_rope, rope_angles

SELECTIVE_COMBOS = [dict(zip(("delta", "B", "C"), bits)) for bits in itertools.product([True, False], repeat=3)]


# ---- RMSNorm -----------------------------------------------------------------------------------
def test_rmsnorm_matches_formula():
    norm = RMSNorm(24, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, dtype=torch.float64))
    x = torch.randn(3, 5, 24, dtype=torch.float64) * 3
    expected = x / torch.sqrt((x * x).sum(-1, keepdim=True) / 24 + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


# ---- RoPE and attention ------------------------------------------------------------------------
def rope_complex(x, theta=10000.0):
    """Independent RoPE: feature pairs (i, i + d/2) as complex numbers times exp(i * pos * freq_i)."""
    length, head_dim = x.shape[-2:]
    half = head_dim // 2
    freqs = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / head_dim)
    rotation = torch.polar(torch.ones(length, half, dtype=torch.float64), torch.arange(length, dtype=torch.float64)[:, None] * freqs)
    rotated = torch.complex(x[..., :half], x[..., half:]) * rotation
    return torch.cat([rotated.real, rotated.imag], dim=-1)


def test_rope_matches_complex_rotation_and_depends_only_on_offset():
    length, head_dim = 40, 16
    cos, sin = rope_angles(torch.arange(length), head_dim, 10000.0, dtype=torch.float64)
    x = torch.randn(2, length, head_dim, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, cos, sin), rope_complex(x), rtol=1e-12, atol=1e-12)

    # the same q and k vector at every position: <rot_i q, rot_j k> must be a function of i - j
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    q_rot = apply_rope(q.expand(length, head_dim), cos, sin)
    k_rot = apply_rope(k.expand(length, head_dim), cos, sin)
    scores = q_rot @ k_rot.T
    for offset in (-7, 0, 3, 25):
        diagonal = torch.diagonal(scores, offset=offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), rtol=1e-10, atol=1e-10)
    assert torch.diagonal(scores, 1)[0] != torch.diagonal(scores, 2)[0]  # and does depend on it
    torch.testing.assert_close(q_rot[0], q)  # position 0 is not rotated
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm().expand(length))  # rotations keep norms


def test_attention_matches_explicit_masked_softmax():
    torch.manual_seed(1)
    d_model, n_head, length = 32, 4, 11
    attn = CausalSelfAttention(d_model, n_head).double()
    x = torch.randn(2, length, d_model, dtype=torch.float64)

    head_dim = d_model // n_head
    q, k, v = (x @ attn.qkv_proj.weight.T).split(d_model, dim=-1)
    q, k, v = (t.view(2, length, n_head, head_dim).transpose(1, 2) for t in (q, k, v))
    q, k = rope_complex(q), rope_complex(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(2, length, d_model) @ attn.o_proj.weight.T

    torch.testing.assert_close(attn(x), y, rtol=1e-10, atol=1e-10)


# ---- the Mamba mixer against a straightforward float64 recomputation ---------------------------
def mixer_by_hand(mixer, u):
    """Every step of the Mamba block written out: explicit window sum for the convolution and a
    time loop for the recurrence, independent of lethe.ops."""
    d_inner, d_state = mixer.d_inner, mixer.d_state
    batch, length, _ = u.shape
    xz = u @ mixer.in_proj.weight.T
    x, z = xz[..., :d_inner], xz[..., d_inner:]  # (batch, length, d_inner)

    weight, width = mixer.conv1d.weight[:, 0], mixer.conv1d.weight.shape[-1]
    conv = torch.stack([
        sum(weight[:, k] * x[:, t - width + 1 + k] for k in range(width) if t - width + 1 + k >= 0) + mixer.conv1d.bias
        for t in range(length)
    ], dim=1)
    x = conv * torch.sigmoid(conv)

    sizes = mixer.x_proj_sizes
    proj = x @ mixer.x_proj.weight.T if mixer.x_proj is not None else x[..., :0]
    dt, B, C = proj.split([sizes["delta"], sizes["B"], sizes["C"]], dim=-1)
    dt_bias = mixer.dt_proj.bias if mixer.dt_proj is not None else mixer.dt_bias
    pre_delta = dt @ mixer.dt_proj.weight.T if mixer.dt_proj is not None else torch.zeros_like(x)
    delta = torch.log1p(torch.exp(pre_delta + dt_bias))
    B = B if sizes["B"] else mixer.B.expand(batch, length, d_state)
    C = C if sizes["C"] else mixer.C.expand(batch, length, d_state)

    A = -torch.exp(mixer.A_log)
    h = torch.zeros(batch, d_inner, d_state, dtype=u.dtype)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        y = (h * C[:, t, None, :]).sum(-1) + mixer.D * x[:, t]
        ys.append(y * z[:, t] * torch.sigmoid(z[:, t]))
    return torch.stack(ys, dim=1) @ mixer.out_proj.weight.T


def random_mixer(selective, scan_impl="reference", **kwargs):
    mixer = MambaMixer(8, d_state=4, d_conv=3, expand=2, dt_rank=3, selective=selective, scan_impl=scan_impl, **kwargs).double()
    with torch.no_grad():  # move D, A and the constants off their structured init so each one matters
        mixer.D.normal_()
        mixer.A_log.add_(0.3 * torch.randn_like(mixer.A_log))
        for p in (mixer.B, mixer.C, mixer.conv1d.bias):
            if p is not None:
                p.normal_()
    return mixer


@pytest.mark.parametrize("impl", FLOAT64_SCAN_IMPLS)
@pytest.mark.parametrize("selective", SELECTIVE_COMBOS, ids=lambda s: "".join(k for k, v in s.items() if v) or "none")
def test_mixer_matches_hand_computation(selective, impl):
    torch.manual_seed(2)
    mixer = random_mixer(selective, impl)
    for trial in range(2):
        u = torch.randn(2, 13, 8, dtype=torch.float64)
        torch.testing.assert_close(mixer(u), mixer_by_hand(mixer, u), rtol=1e-9, atol=1e-10)


def test_mixer_passes_scan_impl_to_the_op(monkeypatch):
    import lethe.modules.mamba as mamba_module

    seen = []
    real = mamba_module.selective_scan

    def spy(*args, **kwargs):
        seen.append((kwargs["impl"], kwargs["delta_softplus"], kwargs["z"] is not None, kwargs["D"] is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(mamba_module, "selective_scan", spy)
    MambaMixer(8, d_state=4, scan_impl="reference")(torch.randn(1, 5, 8))
    assert seen == [("reference", True, True, True)]


# ---- selectivity switches ----------------------------------------------------------------------
@pytest.mark.parametrize("selective", SELECTIVE_COMBOS, ids=lambda s: "".join(k for k, v in s.items() if v) or "none")
def test_x_proj_outputs_only_selective_parts(selective):
    mixer = MambaMixer(32, d_state=16, dt_rank="auto", selective=selective)
    expected = 2 * selective["delta"] + 16 * selective["B"] + 16 * selective["C"]  # dt_rank = ceil(32/16)
    assert (mixer.x_proj.out_features if mixer.x_proj is not None else 0) == expected
    assert (mixer.dt_proj is not None) == selective["delta"]
    assert (mixer.B is None) == selective["B"] and (mixer.C is None) == selective["C"]


def impulse_response_conv(mixer, x):
    """y[t] = sum_k K[k] x[t - k] with K the mixer's SSM response to a unit impulse per channel."""
    length = x.shape[-1]
    impulse = torch.zeros(1, x.shape[1], length, dtype=x.dtype)
    impulse[..., 0] = 1
    kernel = mixer.ssm(impulse)[0][0]  # (d_inner, length)
    return torch.stack([(kernel[:, : t + 1].flip(-1) * x[..., : t + 1]).sum(-1) for t in range(length)], dim=-1)


def test_lti_mixer_is_a_fixed_convolution_and_selective_ones_are_not():
    """With delta, B, C all input-independent the SSM is linear time-invariant: its output is the
    convolution of its input with its own impulse response, it obeys superposition, and a
    zero-padded shift of the input shifts the output. Making any one of them selective breaks it."""
    torch.manual_seed(3)
    x1, x2 = torch.randn(2, 2, 16, 20, dtype=torch.float64)  # (batch, d_inner, length), ssm input
    lti = random_mixer({"delta": False, "B": False, "C": False})
    torch.testing.assert_close(lti.ssm(x1)[0], impulse_response_conv(lti, x1), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(lti.ssm(2 * x1 - 3 * x2)[0], 2 * lti.ssm(x1)[0] - 3 * lti.ssm(x2)[0], rtol=1e-9, atol=1e-10)
    shifted = F.pad(x1, (5, 0))[..., :20]
    torch.testing.assert_close(lti.ssm(shifted)[0][..., 5:], lti.ssm(x1)[0][..., :15], rtol=1e-9, atol=1e-10)

    for name in ("delta", "B", "C"):
        selective = random_mixer({"delta": False, "B": False, "C": False, name: True})
        gap = (selective.ssm(x1)[0] - impulse_response_conv(selective, x1)).abs().max()
        assert gap > 1e-3, f"selective {name} should not be a fixed convolution (gap {gap})"


def test_lti_constants_are_learned():
    mixer = MambaMixer(8, d_state=4, selective={"delta": False, "B": False, "C": False})
    mixer(torch.randn(2, 6, 8)).square().sum().backward()
    for p in (mixer.dt_bias, mixer.B, mixer.C, mixer.A_log, mixer.D):
        assert p.grad is not None and p.grad.abs().sum() > 0


# ---- Mamba init --------------------------------------------------------------------------------
def test_mixer_init_follows_the_paper():
    torch.manual_seed(4)
    dt_min, dt_max = 1e-3, 1e-1
    mixer = MambaMixer(256, d_state=16, dt_min=dt_min, dt_max=dt_max, dt_init_floor=1e-4)
    assert mixer.dt_rank == 16 and mixer.d_inner == 512

    dt = F.softplus(mixer.dt_proj.bias.detach())
    assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
    # log-uniform: log(dt) spreads evenly over [log dt_min, log dt_max]
    log_position = (dt.log() - math.log(dt_min)) / (math.log(dt_max) - math.log(dt_min))
    assert abs(log_position.mean().item() - 0.5) < 0.05 and log_position.min() < 0.02 and log_position.max() > 0.98

    bound = mixer.dt_rank**-0.5
    weight = mixer.dt_proj.weight.detach()
    assert weight.abs().max() <= bound and abs(weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound

    A = -torch.exp(mixer.A_log.detach())
    torch.testing.assert_close(A, -torch.arange(1, 17, dtype=torch.float32).expand(512, 16))
    assert torch.equal(mixer.D.detach(), torch.ones(512))
    assert mixer.A_log.dtype == mixer.D.dtype == torch.float32
    assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None and mixer.conv1d.bias is not None


def test_dt_floor_clamps_small_steps():
    mixer = MambaMixer(64, dt_min=1e-5, dt_max=2e-5, dt_init_floor=1e-3)
    torch.testing.assert_close(F.softplus(mixer.dt_proj.bias.detach()), torch.full((128,), 1e-3), rtol=1e-4, atol=0)
