"""Selective-scan speed: each implementation against the sequential reference, side by side.

    python bench/scan.py                      # CPU-sized shapes
    python bench/scan.py --shapes 2,256,1024,16 --repeats 5

Prints a table of forward and forward+backward wall time (best of --repeats) and the speedup
over the sequential reference measured in the same run.
"""

import argparse
import time

import torch

from lethe.ops import SCAN_IMPL_CHOICES, selective_scan


def make_inputs(batch, channels, length, d_state, device, dtype):
    g = torch.Generator().manual_seed(0)
    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()
    A = (-torch.exp(torch.randn(channels, d_state, generator=g) * 0.5)).to(device).requires_grad_()
    return dict(u=rand(batch, channels, length), delta=rand(batch, channels, length), A=A,
                B=rand(batch, d_state, length), C=rand(batch, d_state, length))


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(impl, inputs, repeats):
    def forward():
        with torch.no_grad():
            selective_scan(**inputs, impl=impl)

    def forward_backward():
        y, _ = selective_scan(**inputs, impl=impl)
        y.float().sum().backward()

    forward(), forward_backward()  # warm-up
    return best_time(forward, repeats), best_time(forward_backward, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["2,256,1024,16", "1,128,4096,16", "4,512,256,16"],
                        help="batch,channels,length,d_state")
    parser.add_argument("--impls", nargs="+", default=[i for i in SCAN_IMPL_CHOICES if i != "auto"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}")
    print(f"| {'shape (b, d, l, n)':<22} | {'impl':<10} | {'fwd ms':>8} | {'fwd+bwd ms':>10} | {'speedup fwd':>11} | {'speedup fwd+bwd':>15} |")
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 10}|{'-' * 12}|{'-' * 13}|{'-' * 17}|")
    for shape in args.shapes:
        dims = tuple(int(s) for s in shape.split(","))
        inputs = make_inputs(*dims, device="cpu", dtype=dtype)
        results = {impl: measure(impl, inputs, args.repeats) for impl in args.impls}
        base = results.get("reference")
        for impl, (fwd, fwd_bwd) in results.items():
            speed = (f"{base[0] / fwd:10.1f}x", f"{base[1] / fwd_bwd:14.1f}x") if base else ("-", "-")
            print(f"| {str(dims):<22} | {impl:<10} | {fwd * 1e3:8.1f} | {fwd_bwd * 1e3:10.1f} | {speed[0]:>11} | {speed[1]:>15} |")


if __name__ == "__main__":
    main()
