"""Packed documents (data.cross_document=false): the test that matters.

For every model family and implementation, a row that packs several documents gives, at every
position, the logits and the gradients of running that position's document alone from an empty
state. The per-op tests (test_scan.py, test_conv_kernel.py, test_kernels.py) check each op against
its reference; this one checks that the whole model honours the boundaries, layer by layer.
"""

import pytest
import torch

from helpers import perturbed
from lethe.errors import ConfigError
from lethe.models import Mamba2LM, MambaLM, TransformerLM
from lethe.ops import documents
from lethe.ops.documents import attention_mask, document_ids, document_positions, masked_attention, tap_mask

VOCAB = 37
IMPLS = {  # name: (model class, options, device)
    "mamba-reference": (MambaLM, {"scan_impl": "reference"}, "cpu"),
    "mamba-chunked": (MambaLM, {"scan_impl": "chunked"}, "cpu"),
    "mamba-cpu-kernel": (MambaLM, {"scan_impl": "cpu"}, "cpu"),
    "mamba2-reference": (Mamba2LM, {"scan_impl": "reference"}, "cpu"),
    "mamba2-chunked": (Mamba2LM, {"scan_impl": "chunked", "chunk_size": 32}, "cpu"),
    "mamba2-cpu-kernel": (Mamba2LM, {"scan_impl": "cpu"}, "cpu"),
    "transformer-sdpa": (TransformerLM, {"attention_impl": "sdpa"}, "cpu"),
    # FlexAttention has no backward on CPU: trained on CUDA only (the forward is checked on CPU below)
    "mamba-cuda-kernel": (MambaLM, {"scan_impl": "cuda"}, "cuda"),
    "mamba2-cuda-kernel": (Mamba2LM, {"scan_impl": "cuda"}, "cuda"),
    "transformer-flex-cuda": (TransformerLM, {"attention_impl": "flex"}, "cuda"),
    "transformer-sdpa-cuda": (TransformerLM, {"attention_impl": "sdpa"}, "cuda"),
}
CPU_IMPLS = [name for name, (_, _, device) in IMPLS.items() if device == "cpu"]
ALL_IMPLS = [pytest.param(name, marks=pytest.mark.gpu) if device == "cuda" else name for name, (_, _, device) in IMPLS.items()]
# rows of 140 steps, documents starting at these steps (the segment before a row's first start
# continues a document begun in an earlier block: it too runs from an empty state)
LAYOUTS = {
    # documents of 17, 66 and 57 steps: the second crosses the CPU kernel's 64-step chunk boundary
    "three-documents": [0, 17, 83],
    "continued-first": [9, 64, 65],  # no start at step 0; a one-step document at 64
    "one-step-documents": [0, 1, 2, 3, 70, 139],  # length-1 documents, and a start at the last step
    "one-document": [0],
}
LENGTH = 140


def build(impl, **overrides):
    cls, options, device = IMPLS[impl]
    torch.manual_seed(0)
    shape = {MambaLM: {"d_state": 4}, Mamba2LM: {"d_state": 4, "headdim": 8, "ngroups": 2},
             TransformerLM: {"n_head": 1}}[cls]  # a head of 16: FlexAttention's smallest
    return perturbed(cls(vocab_size=VOCAB, d_model=16, n_layer=2, **shape, **{**options, **overrides})).to(device)


def segments(starts: list[int]) -> list[tuple[int, int]]:
    bounds = sorted({0, *starts, LENGTH})
    return list(zip(bounds[:-1], bounds[1:]))


def forward_backward(model, tokens, weights, starts=None):
    """logits, and the gradients of (logits * weights).sum() with respect to the embedding output
    (what reaches each position's input) and to every parameter."""
    model.zero_grad()
    hidden = []
    hook = model.embedding.register_forward_hook(lambda module, args, out: hidden.append(out) or out.retain_grad())
    try:
        logits = model(tokens, document_starts=starts)
    finally:
        hook.remove()
    (logits * weights).sum().backward()
    return logits.detach(), hidden[0].grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def packed_row(layout, device="cpu", seed=1):
    tokens = torch.randint(0, VOCAB, (1, LENGTH), generator=torch.Generator().manual_seed(seed))
    starts = torch.zeros(1, LENGTH, dtype=torch.bool)
    starts[0, LAYOUTS[layout]] = True
    return tokens.to(device), starts.to(device)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_a_packed_row_is_its_documents_run_alone(impl, layout):
    model = build(impl)
    device = IMPLS[impl][2]
    tokens, starts = packed_row(layout, device)
    weights = torch.randn(1, LENGTH, model.padded_vocab_size, generator=torch.Generator().manual_seed(3)).to(device)
    logits, hidden_grad, param_grads = forward_backward(model, tokens, weights, starts)

    # alone, each document's logits get the weights of its positions in the row: the packed
    # parameter gradients are the sum of the documents' own
    summed = {n: torch.zeros_like(g) for n, g in param_grads.items()}
    for begin, end in segments(LAYOUTS[layout]):
        alone, alone_hidden_grad, alone_grads = forward_backward(model, tokens[:, begin:end], weights[:, begin:end])
        def where(message, begin=begin, end=end):
            return f"{impl}, document at {begin}..{end}: {message}"
        torch.testing.assert_close(logits[:, begin:end], alone, rtol=1e-5, atol=1e-5, msg=where)
        # gradients: a fused kernel rounds differently where its chunks fall at other steps of the
        # document (up to ~1e-5 here, 2e-5 summed over positions); a leak moves them by ~10
        torch.testing.assert_close(hidden_grad[:, begin:end], alone_hidden_grad, rtol=1e-4, atol=5e-5, msg=where)
        for n, grad in alone_grads.items():
            summed[n] += grad
    for n, grad in param_grads.items():
        torch.testing.assert_close(grad, summed[n], rtol=1e-4, atol=5e-5, msg=lambda message, n=n: f"{impl}: gradient of {n}: {message}")


@pytest.mark.parametrize("impl", ["mamba-cpu-kernel", "mamba2-chunked", "transformer-sdpa"])
def test_without_boundaries_documents_see_each_other(impl):
    """The control that makes the test above able to fail: packed without document_starts, the
    second document's logits depend on the first."""
    model = build(impl)
    tokens = torch.randint(0, VOCAB, (1, LENGTH), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        packed, alone = model(tokens)[:, 17:83], model(tokens[:, 17:83])
        no_starts = model(tokens, document_starts=torch.zeros(1, LENGTH, dtype=torch.bool))
    assert (packed - alone).abs().max() > 1e-3
    torch.testing.assert_close(no_starts, model(tokens), rtol=1e-6, atol=1e-6)  # no start: one document


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_attention_forward_matches_the_boolean_mask(layout):
    """FlexAttention (the CUDA path) computes the same block-diagonal attention as SDPA with the
    boolean mask; on CPU it runs eagerly and forward only."""
    tokens, starts = packed_row(layout)
    with torch.no_grad():
        flex = build("transformer-sdpa", attention_impl="flex")(tokens, document_starts=starts)
        sdpa = build("transformer-sdpa")(tokens, document_starts=starts)
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def test_flex_attention_refuses_to_train_on_cpu():
    tokens, starts = packed_row("three-documents")
    with pytest.raises(ConfigError, match="attention_impl=flex has no backward on CPU"):
        build("transformer-sdpa", attention_impl="flex").train()(tokens, document_starts=starts)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_rows_of_a_batch_keep_their_own_boundaries(impl):
    model = build(impl)
    tokens = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(4))
    starts = torch.zeros(2, LENGTH, dtype=torch.bool)
    starts[0, LAYOUTS["three-documents"]] = True
    starts[1, LAYOUTS["continued-first"]] = True
    with torch.no_grad():
        batched = model(tokens, document_starts=starts)
        for row in range(2):
            torch.testing.assert_close(batched[row : row + 1], model(tokens[row : row + 1], document_starts=starts[row : row + 1]),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_query_tiles_attend_as_the_whole_mask_does(layout, monkeypatch):
    """The SDPA path takes queries a tile at a time, each reading keys from its documents' start:
    outputs and gradients equal one SDPA call with the whole (length x length) mask."""
    _, starts = packed_row(layout)
    starts = torch.cat([starts, torch.roll(starts, 37, dims=1)])  # two rows, different boundaries
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, LENGTH, 8, generator=g, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 2, LENGTH, 8, generator=g)
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(starts))
    expected = torch.autograd.grad(whole, (q, k, v), grad_out)
    monkeypatch.setattr(documents, "QUERY_TILE", 32)  # 5 tiles, the last one short
    tiled = masked_attention(q, k, v, starts, impl="sdpa")
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(tiled, (q, k, v), grad_out), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_document_helpers_on_a_hand_worked_row():
    starts = torch.tensor([[False, False, True, False, False, True, True, False]])
    positions, seen = document_positions(starts)
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0, 0, 1]]
    assert seen.tolist() == [[False, False, True, True, True, True, True, True]]
    assert document_ids(starts).tolist() == [[0, 0, 1, 1, 1, 2, 3, 3]]
    # tap k of a width-3 conv reads 2 - k steps back; lags into the previous document are cut
    assert tap_mask(starts, 3)[0].tolist() == [
        [1, 1, 0, 0, 1, 0, 0, 0],  # two back
        [1, 1, 0, 1, 1, 0, 0, 1],  # one back
        [1, 1, 1, 1, 1, 1, 1, 1],  # the step itself
    ]
    mask = attention_mask(starts)[0, 0]
    assert mask[4].tolist() == [False, False, True, True, True, False, False, False]
    assert mask[7].tolist() == [False] * 6 + [True, True]
    assert mask[1].tolist() == [True, True] + [False] * 6


def test_a_kv_cache_refuses_document_starts():
    model = build("transformer-sdpa")
    states = model.empty_states(1, 8)
    model(torch.zeros(1, 4, dtype=torch.long), states)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), states, document_starts=torch.ones(1, 1, dtype=torch.bool))
