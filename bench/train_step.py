"""Whole-model training steps side by side in one run: Lethe's Mamba (fused and chunked scans),
its parameter-matched Mamba-2 (the reference's d_state 128 and headdim 64; fused and chunked SSD),
a Mamba-2 hybrid (one attention layer, `--hybrid-pattern`) and Transformer++, and transformers'
MambaForCausalLM (the mamba.py parallel scan, and its
default sequential path), the peers a CPU user would pick instead.

    python bench/train_step.py                                  # d_model 256, 4 layers, vocab 256, CPU
    python bench/train_step.py --shapes 4,512 1,2048 --rounds 5
    python bench/train_step.py --device cuda --dtype bfloat16 --d-model 768 --layers 24 --vocab 50280 --shapes 8,2048

A step is forward, backward and an AdamW step on one batch of random tokens (speed does not
depend on the weights), timed as bench/timing.py times (interleaved rounds, medians). Reported:
step time, tokens/s, each against Lethe's fused Mamba, and memory: bytes saved for backward
(activations; on CPU) or peak allocated (CUDA). transformers' models are benchmark-only peers
(`pip install -e .[bench]`): one that cannot be imported is named and left out; its sequential
path (no mamba.py) is timed once per shape without a warm-up, slow by design, and its memory is
not measured (another forward of it would take minutes).
"""

import argparse
import contextlib
import statistics

import torch
from timing import elapsed, keep_freed_memory, measure, saved_bytes

from lethe.models import MambaLM
from lethe.models.matching import MatchedBaseline


def lethe_mamba(args, scan_impl):
    return MambaLM(vocab_size=args.vocab, d_model=args.d_model, n_layer=args.layers, scan_impl=scan_impl)


def matched(args, family, tolerance=0.05, **settings):
    """The model of `family` parameter-matched to Lethe's Mamba at this width and depth (Mamba-2's
    width moves in whole heads: within 5%, the table prints the counts)."""
    from hydra.utils import instantiate

    mamba = {"_target_": "lethe.models.MambaLM", "d_model": args.d_model, "n_layer": args.layers}
    fixed = {k: v for k, v in settings.items() if k in ("d_state", "headdim", "pattern", "mamba2")}
    config, _ = MatchedBaseline(tolerance=tolerance, family=family, settings=fixed)(mamba, args.vocab)
    return instantiate({**config, **{k: v for k, v in settings.items() if k not in fixed}}, vocab_size=args.vocab)


def hf_mamba(args, use_mambapy):
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers, state_size=16,
                         expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True, use_mambapy=use_mambapy,
                         tie_word_embeddings=True)
    if use_mambapy:
        import mambapy  # noqa: F401  (transformers falls back to its sequential loop without it)
    return MambaForCausalLM(config)


def step_fn(model, tokens, device, autocast):
    """One training step of `model` on `tokens`: what a trainer does per batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as conf/optim/adamw.yaml
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def loss():
        with autocast:
            out = model(inputs)
        logits = out.logits if hasattr(out, "logits") else out
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return step, loss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype (parameters stay fp32)")
    parser.add_argument("--shapes", nargs="+", default=["4,512", "1,2048"], help="batch,length")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="turns each model takes (interleaved)")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per model per round")
    parser.add_argument("--models", nargs="+", default=["lethe-mamba", "lethe-mamba-chunked", "lethe-mamba2", "lethe-mamba2-chunked",
                                                        "lethe-hybrid", "lethe-transformer", "hf-mambapy", "hf-sequential"])
    parser.add_argument("--mamba2-state", type=int, default=128, help="Mamba-2's d_state (the reference's 128)")
    parser.add_argument("--mamba2-headdim", type=int, default=64, help="Mamba-2's headdim (the reference's 64)")
    parser.add_argument("--hybrid-pattern", default=None,
                        help="lethe-hybrid's layers (lethe.models.hybrid); default: Mamba-2 with one attention layer in the middle")
    args = parser.parse_args()
    mamba2 = {"d_state": args.mamba2_state, "headdim": args.mamba2_headdim}
    pattern = args.hybrid_pattern or "".join("*" if i == args.layers // 2 else "M" for i in range(args.layers))
    keep_freed_memory()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, torch.bfloat16) if args.dtype == "bfloat16" else contextlib.nullcontext()
    builders = {
        "lethe-mamba": lambda: lethe_mamba(args, "auto"),
        "lethe-mamba-chunked": lambda: lethe_mamba(args, "chunked"),
        "lethe-mamba2": lambda: matched(args, "mamba2", **mamba2),
        "lethe-mamba2-chunked": lambda: matched(args, "mamba2", **mamba2, scan_impl="chunked"),
        # whole Mamba-2 and attention heads move a hybrid's width in steps of 32 (-5% at d_model 256)
        "lethe-hybrid": lambda: matched(args, "hybrid", tolerance=0.1, pattern=pattern, mamba2=mamba2),
        "lethe-transformer": lambda: matched(args, "transformer", max_seq_len=1 << 16),
        "hf-mambapy": lambda: hf_mamba(args, True),
        "hf-sequential": lambda: hf_mamba(args, False),
    }
    models = {}
    for name in args.models:
        torch.manual_seed(0)
        try:
            models[name] = builders[name]().to(device).train()
        except ImportError as exc:
            print(f"{name}: left out, it does not import here ({exc}); pip install -e .[bench]")
    name = torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {name}, {args.dtype}, d_model {args.d_model}, {args.layers} layers (Mamba; the "
          f"Transformer++ has half), vocab {args.vocab}, {args.rounds} interleaved rounds x {args.repeats} steps")
    print("| batch x length | model | params | step ms (best) | tokens/s | vs lethe-mamba | saved MB | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        batch, length = (int(x) for x in shape.split(","))
        tokens = torch.randint(0, args.vocab, (batch, length + 1), generator=torch.Generator().manual_seed(0)).to(device)
        steps = {n: step_fn(m, tokens, device, autocast) for n, m in models.items()}
        timed = {n: (s[0],) for n, s in steps.items() if n != "hf-sequential"}
        results = measure(timed, args.rounds, args.repeats, device)
        if "hf-sequential" in steps:  # a per-token Python loop, minutes a step: timed once, no warm-up (nothing to warm)
            results["hf-sequential"] = [[elapsed(steps["hf-sequential"][0], device)], None]
        medians = {n: statistics.median(r[0]) for n, r in results.items()}
        for n, (times, peak) in results.items():
            saved = saved_bytes(steps[n][1]) / 2**20 if not cuda and n != "hf-sequential" else None
            ratio = f"{medians['lethe-mamba'] / medians[n]:.2f}x" if "lethe-mamba" in medians else "-"
            print(f"| {batch} x {length} | {n} | {sum(p.numel() for p in models[n].parameters()) / 1e6:.2f}M | "
                  f"{medians[n] * 1e3:.1f} ({min(times) * 1e3:.1f}) | {batch * length / medians[n]:,.0f} | {ratio} | "
                  f"{'-' if saved is None else f'{saved:.0f}'} | {'-' if peak is None else f'{peak / 2**20:.0f}'} |", flush=True)
    print("step: forward + backward + AdamW; median (best) of every timed step; tokens/s of the median; "
          "vs lethe-mamba: its step time over this one's (above 1: faster than Lethe's Mamba)")


if __name__ == "__main__":
    main()
