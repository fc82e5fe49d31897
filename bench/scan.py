"""Selective-scan speed and memory: every implementation side by side, in one run.

    python bench/scan.py                                  # CPU-sized shapes (on a GPU: GPU shapes)
    python bench/scan.py --shapes 2,256,1024,16 --repeats 5
    python bench/scan.py --device cuda --dtype bfloat16   # adds GB/s and SDPA attention rows

For each shape (batch, channels, length, d_state) and implementation: forward and
forward+backward wall time (best of --repeats), memory saved for backward, peak memory on CUDA,
and the speedup over the chunked PyTorch scan (and over the sequential reference, where it ran)
measured in the same run. On CUDA it also prints the fused forward's achieved bandwidth against
a device copy measured here, and causal attention (F.scaled_dot_product_attention, flash) at the
same batch, length and d_model = channels / 2 (a Mamba block's d_inner is 2 x d_model): the
paper's "faster than attention past 2K" comparison.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from lethe.ops import SCAN_IMPL_CHOICES, scan_kernels, selective_scan

CPU_SHAPES = ["2,256,1024,16", "1,128,4096,16", "4,512,256,16"]
GPU_SHAPES = ["8,1536,2048,16", "8,1536,8192,16", "1,1536,8192,16", "8,768,4096,16"]


def make_inputs(batch, channels, length, d_state, device, dtype):
    """The model's call: u, delta, z, B, C in the activation dtype; A, D, delta_bias float32."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    return dict(u=rand(batch, channels, length), delta=rand(batch, channels, length, scale=0.5),
                A=(-torch.exp(torch.randn(channels, d_state, generator=g) * 0.5)).to(device).requires_grad_(),
                B=rand(batch, d_state, length), C=rand(batch, d_state, length), D=rand(channels, dtype=torch.float32),
                z=rand(batch, channels, length), delta_bias=rand(channels, dtype=torch.float32, scale=0.1))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, repeats, device):
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def saved_bytes(fn):
    """Bytes autograd keeps for backward (tensors, counted once each)."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def gradient_like(t):
    """The gradient arriving from the next layer: dense, contiguous, in the activation dtype. The
    backward returns the inputs' gradients (torch.autograd.grad) instead of adding them into
    .grad, as inside a model, where u, delta, z, B and C are activations."""
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(1)).to(device=t.device, dtype=t.dtype)


def measure(fn_forward, fn_forward_backward, repeats, device):
    fn_forward(), fn_forward_backward()  # warm-up (and the kernel build on first use)
    fwd = best_time(fn_forward, repeats, device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd = best_time(fn_forward_backward, repeats, device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        fwd_bwd = best_time(fn_forward_backward, repeats, device)
    return fwd, fwd_bwd, peak


def scan_case(impl, inputs, repeats, device):
    def forward():
        with torch.no_grad():
            selective_scan(**inputs, impl=impl)

    leaves = [t for t in inputs.values() if t is not None and t.requires_grad]
    grad_y = gradient_like(inputs["u"])

    def forward_backward():
        y, _ = selective_scan(**inputs, impl=impl)
        torch.autograd.grad(y, leaves, grad_y)

    fwd, fwd_bwd, peak = measure(forward, forward_backward, repeats, device)
    saved = saved_bytes(lambda: selective_scan(**inputs, impl=impl))
    return fwd, fwd_bwd, peak, saved


def attention_case(batch, length, d_model, repeats, device, dtype):
    heads = max(1, d_model // 64)
    q, k, v = (torch.randn(batch, heads, length, d_model // heads, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    grad_out = gradient_like(q)

    def forward_backward():
        torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad_out)

    fwd, fwd_bwd, peak = measure(forward, forward_backward, repeats, device)
    saved = saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    return fwd, fwd_bwd, peak, saved


def copy_bandwidth(device):
    """Device memory bandwidth of a plain copy (bytes read + written per second)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() / best_time(lambda: dst.copy_(src), 10, device)


def forward_bytes(batch, channels, length, d_state, dtype):
    """What the fused forward must move at least: read u, delta, z, B, C; write y (and y before
    the gate, which backward needs with z)."""
    element = torch.empty(0, dtype=dtype).element_size()
    return element * (5 * batch * channels * length + 2 * batch * d_state * length)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", nargs="+", help="batch,channels,length,d_state (default: sized for the device)")
    parser.add_argument("--impls", nargs="+", help="default: every implementation that runs on the device")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-reference-length", type=int, default=4096,
                        help="skip the sequential reference above this length (it is slow by design)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = args.shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    other_device = "cpu" if device.type == "cuda" else "cuda"
    impls = args.impls or [i for i in SCAN_IMPL_CHOICES if i not in ("auto", other_device)]
    for impl in impls:
        reason = scan_kernels.unavailable(impl) if impl in scan_kernels.SOURCES else None
        if reason is not None:
            raise SystemExit(f"error: impl {impl} is unavailable: {reason}")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {name}, dtype {args.dtype}, best of {args.repeats}")
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    if bandwidth:
        print(f"device copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    header = ["shape (b, d, l, n)", "impl", "fwd ms", "fwd+bwd ms", "saved MB", "peak MB", "vs chunked", "vs reference", "fwd GB/s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for shape in shapes:
        batch, channels, length, d_state = (int(s) for s in shape.split(","))
        inputs = make_inputs(batch, channels, length, d_state, device, dtype)
        results = {}
        for impl in impls:
            if impl == "reference" and length > args.max_reference_length:
                continue
            results[impl] = scan_case(impl, inputs, args.repeats, device)
        if device.type == "cuda":
            attention_dtype = dtype if dtype != torch.float32 else torch.bfloat16
            results["sdpa attention"] = attention_case(batch, length, channels // 2, args.repeats, device, attention_dtype)
        for impl, (fwd, fwd_bwd, peak, saved) in results.items():
            def ratio(base):
                return f"{base[0] / fwd:.1f}x / {base[1] / fwd_bwd:.1f}x" if base else "-"
            gbps = "-"
            if bandwidth and impl == "cuda":
                achieved = forward_bytes(batch, channels, length, d_state, dtype) / fwd
                gbps = f"{achieved / 1e9:.0f} ({achieved / bandwidth:.0%})"
            peak_mb = "-" if peak is None else f"{peak / 2**20:.0f}"
            print(f"| {(batch, channels, length, d_state)} | {impl} | {fwd * 1e3:.2f} | {fwd_bwd * 1e3:.2f} | "
                  f"{saved / 2**20:.1f} | {peak_mb} | {ratio(results.get('chunked'))} | {ratio(results.get('reference'))} | {gbps} |")
    print("speedups: forward / forward+backward, measured in this run")


if __name__ == "__main__":
    main()
