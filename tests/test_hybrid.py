"""Hybrid stacks (lethe.models.hybrid): layer patterns parse and fail clearly, presets have their
counts, pure patterns are the pure models, every layer type is causal and keeps to its document in
a mixed stack, sliding-window attention equals an explicit masked softmax, decoding equals the full
forward with a window-bounded KV cache, and hybrids compile as one graph."""

import json
import math

import pytest
import torch

from helpers import assert_one_line, decode_in_segments, model_config, train_losses, train_smoke
from lethe.config import instantiate
from lethe.errors import ConfigError
from lethe.generation import state_bytes
from lethe.models import HybridLM, Mamba2LM, MambaLM, TransformerLM
from lethe.modules import CausalSelfAttention
from lethe.ops.documents import QUERY_TILE

VOCAB = 40
MAMBA2 = {"d_state": 8, "headdim": 16, "chunk_size": 16}
MAMBA = {"d_state": 8}


def hybrid(pattern, seed=0, window=None, d_model=32, **kwargs):
    torch.manual_seed(seed)
    return HybridLM(vocab_size=VOCAB, d_model=d_model, pattern=pattern, mamba2=MAMBA2, mamba=MAMBA,
                    attention={"n_head": 2, "window": window}, mlp={"d_ff": 48}, **kwargs).eval()


# ---- patterns ---------------------------------------------------------------------------------
def test_a_list_pattern_builds_the_same_stack_as_its_string():
    as_list = hybrid(["M", "attention", "mlp", "m"])
    assert as_list.pattern == "M*-m" and as_list.config["pattern"] == "M*-m"
    as_string = hybrid("M*-m")
    ids = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(as_list(ids), as_string(ids), rtol=0, atol=0)


@pytest.mark.parametrize("pattern,needles", [
    ("MMxM", ["model.pattern=MMxM", "'x' at layer 2", "M (Mamba-2)", "m (Mamba)", "* (attention)", "- (MLP)"]),
    ("", ["model.pattern", "empty", "M (Mamba-2)"]),
    ([], ["model.pattern", "empty"]),
    (["M", "mamba2x"], ["model.pattern[1]='mamba2x'", "not a layer type", "attention"]),
    (["MM", "*"], ["model.pattern[0]='MM'"]),
    (3, ["model.pattern=3", "string of layer letters"]),
])
def test_a_bad_pattern_names_the_problem_and_the_valid_letters(pattern, needles):
    with pytest.raises(ConfigError) as info:
        hybrid(pattern)
    assert_one_line(info, *needles)


def test_a_window_without_an_attention_layer_is_refused():
    with pytest.raises(ConfigError) as info:
        hybrid("MM-M", window=16)
    assert_one_line(info, "model.attention.window=16", "no attention layer", "model.pattern=MM-M")


@pytest.mark.parametrize("key,settings,needles", [
    ("mamba2", {"d_stat": 8}, ["model.mamba2.d_stat", "d_state", "headdim"]),
    ("attention", {"n_heads": 2}, ["model.attention.n_heads", "n_head", "window"]),
    ("attention", {"n_head": 3}, ["model.attention.n_head=3", "divisor of model.d_model=32"]),
    ("mamba2", {"headdim": 24}, ["model.mamba2.headdim=24"]),
    ("mamba", {"d_state": 0}, ["model.mamba.d_state=0"]),
    ("mlp", {"d_ff": -1}, ["model.mlp.d_ff=-1"]),
])
def test_a_bad_layer_setting_names_its_type_and_key(key, settings, needles):
    kwargs = {"mamba2": MAMBA2, "mamba": MAMBA, "attention": {"n_head": 2}, "mlp": {}} | {key: settings}
    with pytest.raises(ConfigError) as info:
        HybridLM(vocab_size=VOCAB, d_model=32, pattern="Mm*-", **kwargs)
    assert_one_line(info, *needles)


def test_the_stack_is_described_one_line_per_run_of_layers():
    lines = hybrid("MM*--m").describe_layers()
    assert lines == ["layers 0-1   Mamba-2 (d_state 8, 4 heads of 16)", "layer 2      attention (2 heads of 16)",
                     "layers 3-4   MLP (d_ff 48)", "layer 5      Mamba (d_state 8, d_inner 64)"]
    assert hybrid("m*", window=4).describe_layers()[1] == "layer 1      attention (2 heads of 16, window 4)"


# ---- presets ----------------------------------------------------------------------------------
def count(name, vocab, **overrides):
    with torch.device("meta"):
        return instantiate(model_config(name, **overrides), vocab_size=vocab, _convert_="all").num_params()


def test_hybrid_tiny_and_samba_tiny_are_parameter_matched_to_the_tiny_models():
    tiny = [count(name, 257) for name in ("mamba-tiny", "mamba2-tiny", "transformer-tiny")]
    for name in ("hybrid-tiny", "samba-tiny"):
        params = count(name, 257)
        assert all(abs(params - other) <= 0.05 * other for other in tiny), (name, params, tiny)
    assert model_config("hybrid-tiny")["pattern"] == "MM*M"
    samba = model_config("samba-tiny")
    assert samba["pattern"] == "m-*-" and samba["attention"]["window"] == 128


@pytest.mark.parametrize("name,mamba2_name", [("mamba2-hybrid-130m", "mamba2-130m"), ("mamba2-hybrid-370m", "mamba2-370m")])
def test_mamba2_hybrids_spread_about_8_percent_attention_evenly(name, mamba2_name):
    config = model_config(name)
    pattern, pure = config["pattern"], model_config(mamba2_name)
    attention = [i for i, letter in enumerate(pattern) if letter == "*"]
    assert set(pattern) == {"M", "*"} and len(pattern) == pure["n_layer"] and config["d_model"] == pure["d_model"]
    assert 0.07 <= len(attention) / len(pattern) <= 0.09
    gaps = [b - a for a, b in zip(attention, attention[1:])]
    assert len(set(gaps)) == 1 and attention[0] == gaps[0] // 2  # one in the middle of each equal part
    assert abs(count(name, 50280) - count(mamba2_name, 50280)) <= 0.03 * count(mamba2_name, 50280)


# ---- pure patterns are the pure models --------------------------------------------------------
def test_a_pure_mamba_pattern_is_a_mamba_lm():
    torch.manual_seed(0)
    pure = MambaLM(vocab_size=VOCAB, d_model=32, n_layer=3, d_state=8).eval()
    as_pattern = hybrid("mmm")
    as_pattern.load_state_dict(pure.state_dict())  # the same parameter names, strict
    ids = torch.randint(0, VOCAB, (2, 20))
    torch.testing.assert_close(as_pattern(ids), pure(ids), rtol=0, atol=0)
    assert as_pattern.num_params() == pure.num_params()


def split_mlp_layers(state_dict):
    """A pure model's weights, each block's MLP (mlp, norm2) moved to a layer of its own after it:
    block i becomes pattern layers 2i (mixer) and 2i + 1 (MLP)."""
    remap = {}
    for name, tensor in state_dict.items():
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            mlp = rest.startswith(("mlp.", "norm2."))
            rest = rest.replace("mlp.", "mixer.").replace("norm2.", "norm.") if mlp else rest
            name = f"layers.{2 * int(index) + mlp}.{rest}"
        remap[name] = tensor
    return remap


def test_a_pure_mamba2_pattern_with_mlps_is_a_mamba2_lm_with_d_intermediate():
    torch.manual_seed(0)
    pure = Mamba2LM(vocab_size=VOCAB, d_model=32, n_layer=2, d_intermediate=48, **MAMBA2).eval()
    as_pattern = hybrid("M-M-")
    remap = split_mlp_layers(pure.state_dict())
    as_pattern.load_state_dict(remap)
    ids = torch.randint(0, VOCAB, (2, 20))
    torch.testing.assert_close(as_pattern(ids), pure(ids), rtol=1e-5, atol=1e-5)


def test_a_transformer_pattern_is_a_transformer_lm():
    torch.manual_seed(0)
    pure = TransformerLM(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, d_ff=48).eval()
    as_pattern = hybrid("*-*-")
    remap = split_mlp_layers(pure.state_dict())
    as_pattern.load_state_dict(remap)
    ids = torch.randint(0, VOCAB, (2, 20))
    torch.testing.assert_close(as_pattern(ids), pure(ids), rtol=1e-5, atol=1e-5)
    # the init scales every residual write by the same depth: 2 layers x 2 residuals = 4 blocks
    assert as_pattern.n_residuals_per_layer * len(as_pattern.layers) == pure.n_residuals_per_layer * len(pure.layers)


def test_every_residual_write_is_rescaled_by_the_stack_depth():
    torch.manual_seed(0)
    model = HybridLM(vocab_size=VOCAB, d_model=256, pattern="M*-m" * 2, attention={"n_head": 4}, mlp={"d_ff": 256})
    for name, p in model.named_parameters():
        if name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight")):
            expected = 1 / math.sqrt(3 * p.shape[1]) / math.sqrt(8)  # kaiming-uniform std / sqrt(n_layer)
            assert abs(p.std().item() - expected) < 0.1 * expected, name


# ---- causality and documents in a mixed stack ---------------------------------------------------
MIXED = ["mM*-", "M*", "*m", "-M"]


@pytest.mark.parametrize("pattern,window", [(p, w) for p in MIXED for w in (None, 5) if w is None or "*" in p])
def test_every_layer_type_is_causal_in_a_mixed_stack(pattern, window):
    model = hybrid(pattern, window=window)
    ids = torch.randint(0, VOCAB, (2, 24))
    changed = ids.clone()
    changed[:, 13] = (changed[:, 13] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :13], after[:, :13], rtol=0, atol=0)
    assert (before[:, 13:] - after[:, 13:]).abs().amax() > 1e-4


@pytest.mark.parametrize("window", [None, 4])
def test_packed_documents_are_scored_as_if_each_were_alone(window):
    model = hybrid("mM*-", window=window)
    lengths = [7, 12, 5]
    docs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    starts = torch.zeros_like(packed, dtype=torch.bool)
    starts[0, [0, 7, 19]] = True
    with torch.no_grad():
        together = model(packed, document_starts=starts)
        alone = torch.cat([model(doc) for doc in docs], dim=1)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


# ---- sliding-window attention against an explicit masked softmax ---------------------------------
def reference_window_attention(layer, x, window):
    """The layer's own projections and RoPE, then softmax over the keys j with i - window < j <= i,
    written out in float64."""
    batch, length, d_model = x.shape
    heads, head_dim = layer.n_head, layer.head_dim
    q, k, v = layer.qkv_proj(x).double().view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    inv_freq = layer.rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(head_dim)
    i, j = torch.arange(length)[:, None], torch.arange(length)
    scores = scores.masked_fill(~((j <= i) & (i - j < window)), float("-inf"))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(batch, length, d_model) @ layer.o_proj.weight.double().T


@pytest.mark.parametrize("length,window", [(40, 7), (2 * QUERY_TILE + 37, 100), (30, 30), (20, 64)])
def test_sliding_window_attention_equals_a_masked_softmax(length, window):
    torch.manual_seed(0)
    layer = CausalSelfAttention(32, 2, window=window)
    x = torch.randn(2, length, 32)
    with torch.no_grad():
        expected = reference_window_attention(layer, x, window)
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-5)
        flex = CausalSelfAttention(32, 2, attention_impl="flex", window=window)
        flex.load_state_dict(layer.state_dict())
        torch.testing.assert_close(flex(x).double(), expected, rtol=1e-4, atol=1e-5)


# ---- decoding ----------------------------------------------------------------------------------
DECODED = [("mM*-", None), ("MM*M", 6), ("m-*-", 6), ("*M", 3), ("M-m", None)]


@pytest.mark.parametrize("pattern,window", DECODED)
@pytest.mark.parametrize("segments", [[1] * 20, [9] + [1] * 11, [9, 4, 1, 6]], ids=["steps", "prefill+steps", "blocks"])
def test_step_by_step_logits_equal_the_full_forward(pattern, window, segments):
    model = hybrid(pattern, window=window)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full = model(ids)
    stepped = decode_in_segments(model, ids, segments)
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)


def test_a_windowed_kv_cache_holds_only_the_window():
    full, windowed = hybrid("M*", window=None), hybrid("M*", window=6)
    sizes = {}
    for name, model in (("full", full), ("windowed", windowed)):
        for length in (8, 32):
            _, states = decode_in_segments(model, torch.randint(0, VOCAB, (1, length)), [length // 2] + [1] * (length // 2),
                                           with_states=True)
            sizes[name, length] = state_bytes(states)
            cache = states[1]
            assert cache.keys.shape[2] == (length if name == "full" else 6)
    mamba2_state = sizes["windowed", 8] - 2 * 2 * 6 * 16 * 4  # keys and values: 2 heads x 6 positions x 16
    assert sizes["windowed", 8] == sizes["windowed", 32]
    assert sizes["full", 32] - mamba2_state == 4 * (sizes["full", 8] - mamba2_state) == 2 * 2 * 32 * 16 * 4


@pytest.mark.parametrize("window", [None, 6, 64])
def test_decoding_past_the_states_length_is_refused(window):
    model = hybrid("M*", window=window)  # 64: a window longer than the states' 12 positions
    ids = torch.randint(0, VOCAB, (1, 13))
    states = model.empty_states(1, 12)
    with torch.no_grad():
        model(ids[:, :10], states)
        model(ids[:, 10:12], states)
        with pytest.raises(ValueError, match="holds 12 positions; cannot append up to 13"):
            model(ids[:, 12:], states)


def test_a_window_longer_than_the_sequence_decodes_as_full_attention():
    windowed, full = hybrid("M*", window=64), hybrid("M*")
    ids = torch.randint(0, VOCAB, (2, 20))
    for segments in ([1] * 20, [7, 6, 1, 6]):
        torch.testing.assert_close(decode_in_segments(windowed, ids, segments), decode_in_segments(full, ids, segments),
                                   rtol=1e-5, atol=1e-5)


def test_a_mamba2_layer_takes_the_models_norm_eps_as_mamba2_lm_does():
    layer = HybridLM(vocab_size=VOCAB, d_model=32, pattern="M", mamba2=MAMBA2, norm_eps=1e-3).layers[0].mixer
    pure = Mamba2LM(vocab_size=VOCAB, d_model=32, n_layer=1, norm_eps=1e-3, **MAMBA2).layers[0].mixer
    assert layer.norm.eps == pure.norm.eps == 1e-3


def test_the_mlp_layers_keep_no_decoding_state():
    states = hybrid("M-*-").empty_states(1, 8)
    assert states[1] is None and states[3] is None and states[0] is not None and states[2] is not None


# ---- torch.compile -----------------------------------------------------------------------------
@pytest.mark.parametrize("window", [None, 6])
def test_a_hybrid_compiles_as_one_graph_and_matches_eager(window):
    model = hybrid("mM*-", window=window).train()
    ids = torch.randint(0, VOCAB, (2, 24))

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    expected_loss, expected_grads = loss_and_grads()
    torch._dynamo.reset()
    model.compile(backend="aot_eager", fullgraph=True)  # fullgraph: any graph break is an error
    try:
        loss, grads = loss_and_grads()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, expected_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ---- a real run --------------------------------------------------------------------------------
@pytest.mark.slow
def test_hybrid_tiny_trains_through_train_py(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    train_smoke(run_dir, data_dir, "model=hybrid-tiny", "trainer.max_steps=80", "trainer.val_check_interval=40",
                "trainer.limit_val_batches=8", "seq_len=128", "data.batch_size=8", "trainer.log_every_n_steps=1")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    uniform = math.log(257)  # the untrained model's loss: byte tokenizer, 256 bytes + end-of-text
    assert metrics["model"] == "HybridLM" and metrics["model_config"]["pattern"] == "MM*M"
    assert metrics["val_loss"] < 0.6 * uniform and metrics["test_loss"] < 0.6 * uniform
    losses = train_losses(run_dir)
    assert losses[max(losses)] < losses[min(losses)] - 1.0
    assert metrics["train_tokens_per_s"] > 0
    log = (run_dir / "train.log").read_text()  # the stack, one line per run of layers
    assert "layers 0-1   Mamba-2 (d_state 128, 8 heads of 32)" in log and "layer 2      attention (2 heads of 64)" in log


# ---- on a GPU: FlexAttention's sliding window and the fused kernels in one stack -----------------
@pytest.mark.gpu
@pytest.mark.parametrize("documents", [False, True])
def test_a_windowed_hybrid_on_cuda_matches_cpu_forward_and_backward(documents):
    cpu = hybrid("mM*-", window=24).train()
    gpu = hybrid("mM*-", window=24).train().cuda()
    ids = torch.randint(0, VOCAB, (2, 300))  # past one 128-block: the window's block mask skips some
    starts = None
    if documents:
        starts = torch.zeros_like(ids, dtype=torch.bool)
        starts[:, [0, 70, 211]] = True
    results = []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        logits = model(ids.to(device), document_starts=None if starts is None else starts.to(device))
        logits.logsumexp(-1).mean().backward()
        results.append((logits.detach().cpu(), [p.grad.cpu() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-3, atol=1e-3)
    for got, expected in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-4)
