"""Sampling text from a trained model: prefill the prompt in one parallel pass, then decode one
token at a time from the model's decoding states (Mamba's fixed-size recurrent state, the
Transformer's growing KV cache).

Prompts of different lengths are decoded in lock step without padding: every row is prefilled
with the shortest prompt's length, then each step feeds a row its next prompt token while it
has one ("forced") and its own sample afterwards. No row ever sees a pad token, so every row's
logits equal those of decoding it alone.

On CUDA a Mamba model's decoding step can be captured once in a CUDA graph and replayed for
every token (`cuda_graph=True`): its states have a fixed size and are updated in place, so one
recorded launch sequence serves the whole generation, without the per-kernel launch cost that
dominates small-batch decoding. A Transformer's KV cache grows every step, so it decodes eagerly.
"""

from collections.abc import Callable

import torch

from lethe.errors import ConfigError, is_int, is_number, require


def check_sampling(temperature: float, top_k: int | None, top_p: float, max_new_tokens: int):
    """One-line errors for sampling settings out of range."""
    require(is_number(temperature) and temperature >= 0, "temperature", temperature, "a number >= 0 (0 is greedy decoding)")
    require(top_k is None or is_int(top_k), "top_k", top_k, "an integer >= 1, or null for no top-k filtering")
    require(is_number(top_p) and 0 < top_p <= 1, "top_p", top_p, "a number in (0, 1]; 1 keeps the whole distribution")
    require(is_int(max_new_tokens), "max_new_tokens", max_new_tokens, "an integer >= 1")


def sample_next_token(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0, generator=None):
    """logits (batch, vocab) -> token ids (batch,).

    temperature 0 is greedy (argmax). Otherwise the logits are divided by the temperature, cut
    to the top_k most likely tokens and to the smallest set whose probability reaches top_p
    (nucleus sampling), and one token is drawn from what is left.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the ones ranked above it already reach top_p (the first always stays)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def state_bytes(states: list) -> int:
    """Bytes of decoding state the layers hold (Mamba's recurrent states, attention's KV caches)."""
    tensors = [t for s in states if s is not None for t in vars(s).values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def decoding_state_bytes(model, length: int, batch_size: int = 1) -> int:
    """Bytes of decoding state `model` holds per batch of sequences after `length` tokens."""
    states = model.empty_states(batch_size, length)
    device = next(model.parameters()).device
    model(torch.zeros(batch_size, length, dtype=torch.long, device=device), states)
    return state_bytes(states)


def fixed_size(states: list) -> bool:
    """Whether every layer's decoding state keeps its tensors and size (CUDA-graph replay)."""
    return all(state is None or state.fixed_size for state in states)


class GraphedDecodeStep:
    """One decoding step of `model` on `states`, recorded as a CUDA graph and replayed.

    Call it with the (batch,) tokens to feed; it returns the (batch, vocab) logits in a static
    buffer that the next call overwrites. Warm-up runs (needed before capture) advance the
    states, so they are restored from a copy before recording.
    """

    def __init__(self, model, states):
        kept = [state for state in states if state is not None]  # MLP layers keep none
        if not kept or not fixed_size(states):
            raise ConfigError("cuda_graph=true needs fixed-size decoding states (Mamba layers only); "
                              "an attention layer's KV cache moves every step")
        self.tokens = torch.zeros(kept[0].ssm.shape[0], 1, dtype=torch.long, device=kept[0].ssm.device)
        saved = [{k: t.clone() for k, t in vars(s).items()} for s in kept]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(self.tokens, states)
        torch.cuda.current_stream().wait_stream(side)
        for state, copy in zip(kept, saved):
            for name, tensor in copy.items():
                getattr(state, name).copy_(tensor)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.tokens, states)[:, -1]

    def __call__(self, tokens):
        self.tokens.copy_(tokens[:, None])
        self.graph.replay()
        return self.logits


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    cuda_graph: bool = False,
    stop_when: Callable[[int, list[int]], bool] | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids, at least one) by up to max_new_tokens tokens.

    Returns the new tokens of each prompt; a row stops early after emitting `stop_token`
    (included), or once `stop_when(row, its new tokens)` is true (e.g. a stop string decoded).
    `on_token(row, token)` is called for every new token as it is sampled, for streaming. The
    same seed gives the same tokens. `cuda_graph` replays each step as a CUDA graph (Mamba on a
    CUDA device).
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ConfigError("every prompt needs at least one token (start one with the tokenizer's eos token)")
    device = next(model.parameters()).device
    if cuda_graph and device.type != "cuda":
        raise ConfigError(f"cuda_graph=true needs the model on a CUDA device, not {device.type}")
    generator = torch.Generator(device).manual_seed(seed)
    batch, shortest = len(prompts), min(len(p) for p in prompts)
    states = model.empty_states(batch, max(len(p) for p in prompts) + max_new_tokens)

    prefix = torch.tensor([p[:shortest] for p in prompts], device=device)
    logits = model(prefix, states)[:, -1]
    if cuda_graph:
        step = GraphedDecodeStep(model, states)
    else:
        def step(tokens):
            return model(tokens[:, None], states)[:, -1]
    new_tokens: list[list[int]] = [[] for _ in prompts]
    done = [False] * batch
    position = shortest  # index of the token each row feeds next
    while True:
        sampled = sample_next_token(logits[:, : model.vocab_size], temperature, top_k, top_p, generator).tolist()
        fed = []
        for row, prompt in enumerate(prompts):
            if position < len(prompt):
                fed.append(prompt[position])
                continue
            fed.append(sampled[row])
            if not done[row]:
                new_tokens[row].append(sampled[row])
                if on_token is not None:
                    on_token(row, sampled[row])
                done[row] = (len(new_tokens[row]) == max_new_tokens or sampled[row] == stop_token
                             or (stop_when is not None and stop_when(row, new_tokens[row])))
        if all(done):
            return new_tokens
        logits = step(torch.tensor(fed, device=device))
        position += 1
