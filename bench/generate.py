"""Generation speed and memory: Mamba's and Mamba-2's recurrent states, hybrids' mix of states
and (window-bounded) KV caches, against the Transformer's KV cache, parameter-matched models,
side by side in one run.

    python bench/generate.py                                   # the tiny models, CPU-sized (every family and pattern)
    python bench/generate.py --pairs mamba-130m:mamba2-130m:transformer-125m --vocab 50280 --device cuda

For each batch size and prompt length: the prefill time (one parallel pass over the prompts),
decoding throughput (new tokens per second over the whole batch, greedy, through
`lethe.generation.generate`), the bytes of decoding state after the last token, and on CUDA
the peak memory allocated. Models are randomly initialized: speed does not depend on weights.
"""

import argparse
import contextlib
import time

import torch
from hydra.utils import instantiate

from lethe.config import compose
from lethe.generation import fixed_size, generate, state_bytes


def build(name, vocab, device):
    config = compose("train", f"model={name}").model
    torch.manual_seed(0)
    # no context limit for a benchmark of long prompts (RoPE has no learned positions)
    unbounded = {"max_seq_len": 1 << 20} if "max_seq_len" in config else {}
    return instantiate(config, vocab_size=vocab, **unbounded).to(device).eval()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, batch, prompt_length, new_tokens, device, repeats, cuda_graph=False):
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.vocab_size, (batch, prompt_length), generator=g)

    def prefill():
        states = model.empty_states(batch, prompt_length + new_tokens)
        with torch.no_grad():
            model(prompts.to(device), states)
        synchronize(device)
        return states

    def full():
        generate(model, prompts.tolist(), new_tokens, temperature=0, cuda_graph=cuda_graph)
        synchronize(device)

    def best(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    prefill(), full()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefill_s, total_s = best(prefill), best(full)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    states = prefill()
    with torch.no_grad():  # the state after all new tokens: prompt + new_tokens positions
        for _ in range(new_tokens):
            model(prompts[:, -1:].to(device), states)
    decode_s = max(total_s - prefill_s, 1e-9)
    return {"prefill_ms": 1e3 * prefill_s, "tok_s": batch * new_tokens / decode_s,
            "state_mb": state_bytes(states) / 2**20, "peak_mb": None if peak is None else peak / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["mamba-tiny:mamba2-tiny:hybrid-tiny:samba-tiny:transformer-tiny"],
                        help="model configs compared together, ':'-separated, the last the baseline of the ratio column")
    parser.add_argument("--vocab", type=int, default=257, help="vocabulary size (257: the byte tokenizer)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 1024], help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cuda-graph", action="store_true", help="replay Mamba's (and Mamba-2's) decoding steps as CUDA graphs")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", torch.bfloat16, cache_enabled=False) if cuda else contextlib.nullcontext()

    graphs = ", Mamba decoding in CUDA graphs" if args.cuda_graph else ""
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, {args.new_tokens} new tokens, greedy{graphs}")
    print("| model | params | batch | prompt | prefill ms | decode tok/s | state MB | peak MB | tok/s vs transformer |")
    print("|---|---|---|---|---|---|---|---|---|")
    for pair in args.pairs:
        names = pair.split(":")
        models = [build(name, args.vocab, device) for name in names]
        for batch in args.batches:
            for prompt_length in args.prompts:
                with autocast:
                    results = [measure(m, batch, prompt_length, args.new_tokens, device, args.repeats,
                                       cuda_graph=args.cuda_graph and fixed_size(m.empty_states(1, 1)))
                               for m in models]
                for name, model, r in zip(names, models, results):
                    peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
                    print(f"| {name} | {model.num_params() / 1e6:.2f}M | {batch} | {prompt_length} | {r['prefill_ms']:.1f} "
                          f"| {r['tok_s']:.0f} | {r['state_mb']:.2f} | {peak} | {r['tok_s'] / results[-1]['tok_s']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
