"""Attention over packed documents: the block-diagonal causal mask against plain causal
attention, side by side in one run (data.cross_document=false against true).

    python bench/attention.py                                   # CPU: SDPA causal vs SDPA + mask
    python bench/attention.py --shapes 2,1024,256 --document-length 128
    python bench/attention.py --document-length 1000000             # one document a row: the mask's overhead
    python bench/attention.py --device cuda --dtype bfloat16    # adds FlexAttention (compiled)

For each shape (batch, length, d_model; heads of 64) and path: forward and forward+backward time
(medians of interleaved rounds, as bench/timing.py times), and the ratio to causal attention
without documents. Paths:
  causal       F.scaled_dot_product_attention(is_causal=True): what crossing documents costs
  sdpa + mask  SDPA with the boolean document mask, in tiles of 256 queries that read keys from
               their documents' start only: Lethe's CPU path (lethe.ops.documents.masked_attention,
               impl sdpa; a masked SDPA alone computes every query-key pair)
  flex         FlexAttention with the block mask: Lethe's CUDA path; it skips every 128 x 128
               block the mask empties, so it can beat causal attention when documents are short
On CPU flex runs eagerly (no compiled CPU kernel here) and has no backward: it is left out.
"""

import argparse
import statistics

import torch
import torch.nn.functional as F
from timing import keep_freed_memory, measure, random_document_starts

from lethe.ops.documents import masked_attention

CPU_SHAPES = ["4,512,256", "1,2048,256", "2,1024,512"]
GPU_SHAPES = ["8,2048,768", "4,8192,768", "1,16384,1024"]


def attention_cases(batch, length, d_model, mean_length, device, dtype):
    heads = max(1, d_model // 64)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, d_model // heads, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    grad_out = torch.randn(q.shape, generator=g).to(device, dtype)
    starts = random_document_starts(batch, length, mean_length, device)
    paths = {
        "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa + mask": lambda: masked_attention(q, k, v, starts, impl="sdpa"),
    }
    if device.type == "cuda":
        paths["flex"] = lambda: masked_attention(q, k, v, starts, impl="flex")
    cases = {}
    for name, attend in paths.items():
        def forward(attend=attend):
            with torch.no_grad():
                attend()

        def forward_backward(attend=attend):
            torch.autograd.grad(attend(), (q, k, v), grad_out)

        cases[name] = (forward, forward_backward)
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", nargs="+", help="batch,length,d_model (default: sized for the device)")
    parser.add_argument("--document-length", type=int, default=256, help="mean length of the packed documents")
    parser.add_argument("--rounds", type=int, default=5, help="turns each path takes (interleaved)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per path per round")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    keep_freed_memory()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {name}, dtype {args.dtype}, documents of mean length {args.document_length}, "
          f"{args.rounds} interleaved rounds x {args.repeats} calls")
    header = ["shape (b, l, d)", "path", "fwd ms", "fwd+bwd ms", "fwd vs causal", "fwd+bwd vs causal"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for shape in args.shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES):
        batch, length, d_model = (int(s) for s in shape.split(","))
        results = measure(attention_cases(batch, length, d_model, args.document_length, device, dtype), args.rounds, args.repeats, device)
        medians = {path: (statistics.median(f), statistics.median(fb)) for path, (f, fb, _) in results.items()}
        for path, (fwd, fwd_bwd) in medians.items():
            print(f"| {(batch, length, d_model)} | {path} | {fwd * 1e3:.2f} | {fwd_bwd * 1e3:.2f} | "
                  f"{fwd / medians['causal'][0]:.2f}x | {fwd_bwd / medians['causal'][1]:.2f}x |")
    print("times: medians of every timed call; ratios: time against causal attention without documents (> 1: slower)")


if __name__ == "__main__":
    main()
