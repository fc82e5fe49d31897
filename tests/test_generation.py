"""Recurrent decoding and sampling: step-by-step logits equal the full forward pass, prompts of
different lengths decode as if alone, sampling filters do what they say, generation is seeded."""

import pytest
import torch

from helpers import CPU_SCAN_IMPLS, CPU_SSD_IMPLS, decode_in_segments, perturbed, run_script
from lethe.data import byte_tokenizer
from lethe.errors import ConfigError
from lethe.generation import generate, sample_next_token, state_bytes
from lethe.models import Mamba2LM, MambaLM, TransformerLM
from lethe.ops import causal_conv1d, causal_conv1d_reference
from lethe.training.checkpoint import save_model_checkpoint

VOCAB = 61


def tiny_model(kind, scan_impl="auto", seed=0):
    torch.manual_seed(seed)
    if kind == "mamba":
        model = MambaLM(vocab_size=VOCAB, d_model=32, n_layer=2, d_state=8, scan_impl=scan_impl)
    elif kind == "mamba2":  # a chunk shorter than the prompts: prefill crosses chunk boundaries
        model = Mamba2LM(vocab_size=VOCAB, d_model=32, n_layer=2, d_state=8, headdim=16, chunk_size=8, scan_impl=scan_impl)
    else:
        model = TransformerLM(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, max_seq_len=64)
    return perturbed(model)


MODELS = ([("mamba", impl) for impl in CPU_SCAN_IMPLS] + [("mamba2", impl) for impl in CPU_SSD_IMPLS]
          + [("transformer", None)])


@pytest.mark.parametrize("kind,impl", MODELS)
def test_step_by_step_logits_equal_the_full_forward(kind, impl):
    model = tiny_model(kind, impl)
    ids = torch.randint(0, VOCAB, (3, 37))
    with torch.no_grad():
        full = model(ids)
        steps = decode_in_segments(model, ids, [1] * 37)
        prefill_then_steps = decode_in_segments(model, ids, [20] + [1] * 17)
        uneven = decode_in_segments(model, ids, [5, 1, 12, 1, 1, 17])  # multi-token continuations too
    for logits in (steps, prefill_then_steps, uneven):
        torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "transformer"])
def test_decoding_states_depend_on_the_history(kind):
    """A sanity check on the test above: without its history, a step gives other logits."""
    model = tiny_model(kind)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        with_history = decode_in_segments(model, ids, [11, 1])[:, -1]
        alone = model(ids[:, -1:])[:, -1]
    assert (with_history - alone).abs().max() > 1e-2


def test_mamba_state_is_constant_size_and_the_kv_cache_grows():
    sizes = {}
    for kind in ("mamba", "mamba2", "transformer"):
        model = tiny_model(kind)
        for length in (8, 32):
            states = model.empty_states(1, length)
            with torch.no_grad():
                model(torch.randint(0, VOCAB, (1, length)), states)
            sizes[kind, length] = state_bytes(states)
    # Mamba: (d_conv - 1 + d_state) floats per channel per layer, whatever the length
    assert sizes["mamba", 8] == sizes["mamba", 32] == 2 * 64 * (3 + 8) * 4
    # Mamba-2: the conv window over xBC (64 + 2 * 8 channels) and 4 heads x (16 x 8) states per layer
    assert sizes["mamba2", 8] == sizes["mamba2", 32] == 2 * ((64 + 16) * 3 + 4 * 16 * 8) * 4
    # attention: keys and values of every position
    assert sizes["transformer", 32] == 4 * sizes["transformer", 8] == 2 * 2 * 32 * 32 * 4


def test_decoding_past_the_transformers_context_is_refused():
    model = tiny_model("transformer")
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len=64"):
        model.empty_states(1, 65)
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len=64"):
        generate(model, [[1] * 60], max_new_tokens=5)


def test_conv_continues_from_carried_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 13, generator=g, dtype=torch.float64)
    w, bias = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    full = causal_conv1d(x, w, bias, "silu")
    first, carried = causal_conv1d(x[..., :6], w, bias, "silu", return_final_states=True)
    torch.testing.assert_close(carried, x[..., 3:6])  # the last width-1 inputs
    second = causal_conv1d(x[..., 6:], w, bias, "silu", initial_states=carried)
    torch.testing.assert_close(torch.cat([first, second], -1), full)
    reference = causal_conv1d_reference(x[..., 6:], w, bias, "silu", initial_states=carried)
    torch.testing.assert_close(second, reference)


# ---- sampling ----------------------------------------------------------------------------
def test_greedy_filters_and_temperature_zero_pick_the_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    argmax = logits.argmax(-1)
    assert torch.equal(sample_next_token(logits, temperature=0), argmax)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample_next_token(logits, top_k=1, generator=g), argmax)
        assert torch.equal(sample_next_token(logits, top_p=1e-6, generator=g), argmax)


def test_sampling_frequencies_follow_the_filtered_distribution():
    # probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]])
    logits = probs.log().expand(20000, -1)
    g = torch.Generator().manual_seed(0)

    def frequencies(**kwargs):
        tokens = sample_next_token(logits, generator=g, **kwargs)
        return torch.bincount(tokens, minlength=5).double() / len(tokens)

    # 20000 draws: a frequency's standard error is at most 0.0036; 0.015 is > 4 of them
    torch.testing.assert_close(frequencies(), probs[0].double(), atol=0.015, rtol=0)
    torch.testing.assert_close(frequencies(top_k=2), torch.tensor([2 / 3, 1 / 3, 0, 0, 0]).double(), atol=0.015, rtol=0)
    # top_p 0.7: 0.5 < 0.7, 0.5 + 0.25 reaches it, so the nucleus is the first two
    torch.testing.assert_close(frequencies(top_p=0.7), torch.tensor([2 / 3, 1 / 3, 0, 0, 0]).double(), atol=0.015, rtol=0)
    # temperature 2 flattens: p ~ sqrt(p)
    flat = probs[0].double().sqrt() / probs[0].double().sqrt().sum()
    torch.testing.assert_close(frequencies(temperature=2.0), flat, atol=0.015, rtol=0)


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "transformer"])
def test_a_batch_of_prompts_decodes_as_if_each_were_alone(kind):
    model = tiny_model(kind)
    prompts = [[3, 1, 4, 1, 5], [9], [2, 6, 5]]
    together = generate(model, prompts, max_new_tokens=12, temperature=0)
    alone = [generate(model, [p], max_new_tokens=12, temperature=0)[0] for p in prompts]
    assert together == alone
    # and greedy decoding is the argmax of the full forward pass at every step
    for prompt, new in zip(prompts, together):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + new]))[0, len(prompt) - 1 : -1, :VOCAB]
        assert logits.argmax(-1).tolist() == new


@pytest.mark.parametrize("kind", ["mamba", "transformer"])
def test_sampling_is_seeded_and_stops_at_the_stop_token(kind):
    model = tiny_model(kind)
    prompts = [[1, 2, 3], [4, 5]]
    first = generate(model, prompts, max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    again = generate(model, prompts, max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    other = generate(model, prompts, max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.9, seed=8)
    assert first == again and first != other
    assert all(len(tokens) == 30 for tokens in first)
    stop = first[0][4]
    stopped = generate(model, prompts, max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.9, seed=7, stop_token=stop)
    assert stopped[0] == first[0][: first[0].index(stop) + 1]


def test_streaming_callback_sees_every_new_token_in_order():
    model = tiny_model("mamba")
    seen = []
    new = generate(model, [[1, 2], [3, 4, 5, 6]], max_new_tokens=6, seed=3, on_token=lambda row, tok: seen.append((row, tok)))
    for row in (0, 1):
        assert [tok for r, tok in seen if r == row] == new[row]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": -1.0}, r"temperature=-1.0 is out of range: expected a number >= 0"),
        ({"top_k": 0}, r"top_k=0 is out of range: expected an integer >= 1"),
        ({"top_p": 0.0}, r"top_p=0.0 is out of range: expected a number in \(0, 1\]"),
        ({"max_new_tokens": 0}, r"max_new_tokens=0 is out of range: expected an integer >= 1"),
    ],
)
def test_bad_sampling_settings_fail_in_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        generate(tiny_model("mamba"), [[1]], **{"max_new_tokens": 4, **kwargs})


def test_an_empty_prompt_is_refused():
    with pytest.raises(ConfigError, match="at least one token"):
        generate(tiny_model("mamba"), [[1], []], max_new_tokens=4)


# ---- generate.py -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A byte-level Mamba saved as a Lethe checkpoint (random weights: decoding needs no training)."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = perturbed(MambaLM(vocab_size=len(tokenizer), d_model=32, n_layer=2, d_state=8))
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    save_model_checkpoint(model, tokenizer, path, source={"format": "test"})
    return path, model, tokenizer


@pytest.mark.slow
def test_generate_cli_streams_the_greedy_continuation(checkpoint, tmp_path):
    path, model, tokenizer = checkpoint
    proc = run_script("generate.py", f"ckpt={path}", 'prompt="def main("', "temperature=0", "max_new_tokens=40",
                      "stop_at_eos=false", "device=cpu", f"paths.log_dir={tmp_path}")  # Hydra's generate.log: not in the repo
    prompt = [tokenizer.eos_token_id] + tokenizer.encode("def main(", add_special_tokens=False)
    expected = tokenizer.decode(generate(model, [prompt], max_new_tokens=40, temperature=0)[0])
    # random weights emit arbitrary bytes: the stream still ends with exactly the decoded text
    assert proc.stdout == "def main(" + expected + "\n"
    assert "40 new tokens in" in proc.stderr and "tokens/s, cpu" in proc.stderr


@pytest.mark.slow
def test_generate_cli_decodes_a_batch_and_refuses_bad_input(checkpoint, tmp_path):
    path, _, _ = checkpoint
    logs = f"paths.log_dir={tmp_path}"
    out = run_script("generate.py", f"ckpt={path}", 'prompt=["import os","class A"]', "max_new_tokens=8", "seed=3", logs).stdout
    assert "--- [0] ---\nimport os" in out and "--- [1] ---\nclass A" in out
    for args, message in [((), "no checkpoint"), ((f"ckpt={path}", "top_k=0"), "top_k=0 is out of range: expected an integer >= 1"),
                          ((f"ckpt={path}", "device=tpu"), "device='tpu'")]:
        proc = run_script("generate.py", *args, logs, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


# ---- CUDA graphs -------------------------------------------------------------------------
def test_cuda_graph_needs_a_cuda_device():
    with pytest.raises(ConfigError, match="needs the model on a CUDA device"):
        generate(tiny_model("mamba"), [[1]], max_new_tokens=4, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_matches_eager_decoding(dtype, kind):
    model = tiny_model(kind).cuda()
    prompts = [[3, 1, 4, 1, 5], [9], [2, 6, 5]]
    with torch.autocast("cuda", dtype, enabled=dtype != torch.float32, cache_enabled=False):
        eager = generate(model, prompts, max_new_tokens=24, temperature=1.0, seed=5)
        graphed = generate(model, prompts, max_new_tokens=24, temperature=1.0, seed=5, cuda_graph=True)
    assert graphed == eager


@pytest.mark.gpu
@pytest.mark.parametrize("kind,impl", [("mamba", "auto"), ("mamba2", "auto"), ("mamba2", "cuda"), ("mamba2", "chunked")])
def test_cuda_graph_step_logits_equal_the_full_forward(kind, impl):
    """Prefill through the implementation, then graphed steps: the full forward's logits."""
    from lethe.generation import GraphedDecodeStep

    model = tiny_model(kind, impl).cuda()
    ids = torch.randint(0, VOCAB, (2, 30), device="cuda")
    with torch.no_grad():
        full = model(ids)
        states = model.empty_states(2, 30)
        logits = [model(ids[:, :10], states)]
        step = GraphedDecodeStep(model, states)
        logits += [step(ids[:, t]).clone()[:, None] for t in range(10, 30)]
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-5, atol=1e-5)


def test_cuda_graph_is_refused_for_a_growing_kv_cache():
    from lethe.generation import GraphedDecodeStep

    model = tiny_model("transformer")
    states = model.empty_states(1, 8)
    with pytest.raises(ConfigError, match="fixed-size decoding states"):
        GraphedDecodeStep(model, states)
