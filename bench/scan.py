"""Scan speed and memory, Mamba-1's selective scan and Mamba-2's SSD scan: every implementation
side by side, in one run.

    python bench/scan.py                                  # both tables, CPU-sized shapes (on a GPU: GPU shapes)
    python bench/scan.py --tables mamba --shapes 2,256,1024,16 --rounds 10
    python bench/scan.py --tables mamba2 --ssd-shapes 2,8,64,128,2048
    python bench/scan.py --device cuda --dtype bfloat16   # adds GB/s and SDPA attention rows

Mamba-2 (`--tables mamba2`, shapes batch,nheads,headdim,d_state,length): Lethe's SSD paths
(chunked at the model's chunk 256 and at 64, the fused kernel of the device where it builds, the
sequential reference at short lengths) against transformers' Mamba2 torch path (its
`mamba2_chunk_scan`, what every transformers user without mamba_ssm runs) and Lethe's Mamba-1
fused scan at the same d_inner (nheads x headdim channels, Mamba-1's d_state 16), with ratios
to both measured in the same run.

For each shape (batch, channels, length, d_state) and implementation: forward and
forward+backward wall time (also with packed documents, "+ documents": the state reset at
document starts every --document-length steps on average, data.cross_document=false), memory
saved for backward, peak memory on CUDA, and the speedup over the chunked PyTorch scan (and
over the sequential reference, where it ran) measured in the same run. On CUDA it also prints
the fused forward's achieved bandwidth against a device copy measured here, and causal
attention (F.scaled_dot_product_attention, flash) at the same batch, length and d_model =
channels / 2 (a Mamba block's d_inner is 2 x d_model): the paper's "faster than attention past
2K" comparison.

How it times: the implementations take turns, round by round (each round: one untimed call to
warm the caches the others just used, then --repeats timed calls of each), so on a shared
machine all of them see the same noisy minutes; timed one after the other, a 15 ms kernel
measurement can fall in a slow stretch that a 500 ms one averages over. Times are the median of
the --rounds x --repeats timed calls, the best in parentheses; speedups are ratios of medians
(the typical call; a best-of ratio compares two lucky calls), and the best-to-best ratio is
printed too. Freed memory stays in the process (keep_freed_memory), so no implementation is
timed for page faults.
"""

import argparse
import statistics

import torch
import torch.nn.functional as F
from timing import best_time, keep_freed_memory, measure, random_document_starts, saved_bytes

from lethe.ops import SCAN_IMPL_CHOICES, SSD_IMPL_CHOICES, kernel_build, selective_scan, ssd_scan

CPU_SHAPES = ["2,256,1024,16", "1,128,4096,16", "4,512,256,16"]
GPU_SHAPES = ["8,1536,2048,16", "8,1536,8192,16", "1,1536,8192,16", "8,768,4096,16"]
SSD_CPU_SHAPES = ["2,8,64,128,2048", "4,8,64,128,512"]  # batch, nheads, headdim, d_state, length
SSD_GPU_SHAPES = ["8,24,64,128,2048", "2,24,64,128,8192"]  # mamba2-130m's layer (d_model 768)


def make_inputs(batch, channels, length, d_state, device, dtype):
    """The model's call: u, delta, z, B, C in the activation dtype; A, D, delta_bias float32."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    return dict(u=rand(batch, channels, length), delta=rand(batch, channels, length, scale=0.5),
                A=(-torch.exp(torch.randn(channels, d_state, generator=g) * 0.5)).to(device).requires_grad_(),
                B=rand(batch, d_state, length), C=rand(batch, d_state, length), D=rand(channels, dtype=torch.float32),
                z=rand(batch, channels, length), delta_bias=rand(channels, dtype=torch.float32, scale=0.1))


def gradient_like(t):
    """The gradient arriving from the next layer: dense, contiguous, in the activation dtype. The
    backward returns the inputs' gradients (torch.autograd.grad) instead of adding them into
    .grad, as inside a model, where u, delta, z, B and C are activations."""
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(1)).to(device=t.device, dtype=t.dtype)


def scan_case(impl, inputs, document_starts=None):
    """(forward, forward_backward) of one implementation, and the bytes it saves for backward."""
    def scan():
        return selective_scan(**inputs, impl=impl, document_starts=document_starts)

    def forward():
        with torch.no_grad():
            scan()

    leaves = [t for t in inputs.values() if t is not None and t.requires_grad]
    grad_y = gradient_like(inputs["u"])

    def forward_backward():
        torch.autograd.grad(scan()[0], leaves, grad_y)

    return (forward, forward_backward), saved_bytes(scan)


def attention_case(batch, length, d_model, device, dtype):
    heads = max(1, d_model // 64)
    q, k, v = (torch.randn(batch, heads, length, d_model // heads, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    grad_out = gradient_like(q)

    def forward_backward():
        torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad_out)

    return (forward, forward_backward), saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))


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


def mamba_table(args, device, dtype, impls, bandwidth):
    """The Mamba-1 table: every selective-scan implementation, with and without packed documents."""
    shapes = args.shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    header = ["shape (b, d, l, n)", "impl", "fwd ms", "fwd+bwd ms", "saved MB", "peak MB", "vs chunked", "vs reference",
              "fwd+bwd vs chunked, best", "fwd GB/s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    documents_cost = []
    for shape in shapes:
        batch, channels, length, d_state = (int(s) for s in shape.split(","))
        inputs = make_inputs(batch, channels, length, d_state, device, dtype)
        cases, saved = {}, {}
        for impl in impls:
            if impl == "reference" and length > args.max_reference_length:
                continue
            cases[impl], saved[impl] = scan_case(impl, inputs)
        if args.document_length:
            starts = random_document_starts(batch, length, args.document_length, device)
            for impl in [i for i in impls if i != "reference"]:
                cases[f"{impl} + documents"], saved[f"{impl} + documents"] = scan_case(impl, inputs, starts)
        if device.type == "cuda":
            attention_dtype = dtype if dtype != torch.float32 else torch.bfloat16
            cases["sdpa attention"], saved["sdpa attention"] = attention_case(batch, length, channels // 2, device, attention_dtype)
        results = measure(cases, args.rounds, args.repeats, device)
        medians = {impl: (statistics.median(f), statistics.median(fb)) for impl, (f, fb, _) in results.items()}
        for impl, (forward_times, forward_backward_times, peak) in results.items():
            fwd, fwd_bwd = medians[impl]

            def ratio(base):
                return f"{medians[base][0] / fwd:.1f}x / {medians[base][1] / fwd_bwd:.1f}x" if base in medians else "-"
            best_ratio = "-"
            if "chunked" in results:
                best_ratio = f"{min(results['chunked'][1]) / min(forward_backward_times):.1f}x"
            gbps = "-"
            if bandwidth and impl == "cuda":
                achieved = forward_bytes(batch, channels, length, d_state, dtype) / fwd
                gbps = f"{achieved / 1e9:.0f} ({achieved / bandwidth:.0%})"
            peak_mb = "-" if peak is None else f"{peak / 2**20:.0f}"
            print(f"| {(batch, channels, length, d_state)} | {impl} | {fwd * 1e3:.2f} ({min(forward_times) * 1e3:.2f}) | "
                  f"{fwd_bwd * 1e3:.2f} ({min(forward_backward_times) * 1e3:.2f}) | {saved[impl] / 2**20:.1f} | {peak_mb} | "
                  f"{ratio('chunked')} | {ratio('reference')} | {best_ratio} | {gbps} |")
        for impl in [i for i in medians if f"{i} + documents" in medians]:
            with_docs = medians[f"{impl} + documents"]
            documents_cost.append(f"{impl} at {(batch, channels, length, d_state)}: {with_docs[0] / medians[impl][0]:.3f}x forward, "
                                  f"{with_docs[1] / medians[impl][1]:.3f}x forward+backward")
    print("times: median (best) of every timed call; speedups: forward / forward+backward, of the medians, "
          "measured in this run")
    if documents_cost:
        print(f"with packed documents (mean length {args.document_length}) / without, medians:")
        print("\n".join(f"  {line}" for line in documents_cost))



def ssd_inputs(batch, nheads, headdim, d_state, length, device, dtype):
    """The Mamba-2 layer's call: x, B, C (one group) and the raw dt in the activation dtype; A, D,
    dt_bias float32, as the mixer passes them."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    A = -torch.empty(nheads).uniform_(1, 16, generator=g)
    return dict(x=rand(batch, length, nheads, headdim), dt=rand(batch, length, nheads, scale=0.5),
                A=A.to(device).requires_grad_(), B=rand(batch, length, 1, d_state), C=rand(batch, length, 1, d_state),
                D=rand(nheads, dtype=torch.float32), dt_bias=(rand(nheads, dtype=torch.float32, scale=0.5) - 3).detach().requires_grad_())


def ssd_case(scan, inputs):
    """(forward, forward_backward) of one SSD implementation `scan(**inputs) -> y`, and its saved bytes."""
    def forward():
        with torch.no_grad():
            scan()

    leaves = [t for t in inputs.values() if t.requires_grad]
    grad_y = gradient_like(inputs["x"])

    def forward_backward():
        torch.autograd.grad(scan(), leaves, grad_y)

    return (forward, forward_backward), saved_bytes(scan)


def transformers_ssd(inputs):
    """transformers' Mamba2 torch path (chunk 256, as its Mamba2Config), or None without transformers."""
    try:
        from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
    except ImportError:
        return None
    x, dt, A, B, C, D, dt_bias = (inputs[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias"))
    return lambda: mamba2_chunk_scan(x, dt, A, B, C, 256, D=D, dt_bias=dt_bias, dt_softplus=True)


def ssd_table(args, device, dtype, impls):
    """The Mamba-2 table: Lethe's SSD paths, transformers' torch path and Lethe's Mamba-1 fused scan."""
    header = ["shape (b, h, p, n, l)", "impl", "fwd ms", "fwd+bwd ms", "saved MB", "peak MB", "vs transformers",
              "vs mamba-1 fused"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    mamba1_impl = device.type if kernel_build.unavailable(device.type) is None else "chunked"
    for shape in args.ssd_shapes or (SSD_GPU_SHAPES if device.type == "cuda" else SSD_CPU_SHAPES):
        batch, nheads, headdim, d_state, length = (int(s) for s in shape.split(","))
        inputs = ssd_inputs(batch, nheads, headdim, d_state, length, device, dtype)
        cases, saved = {}, {}
        for impl in impls:
            if impl == "reference" and length > args.max_ssd_reference_length:
                continue
            for chunk in ((256, 64) if impl == "chunked" else (256,)):
                label = f"lethe {impl}" + (f" (chunk {chunk})" if impl == "chunked" else "")
                cases[label], saved[label] = ssd_case(lambda impl=impl, chunk=chunk: ssd_scan(**inputs, impl=impl, chunk_size=chunk)[0],
                                                      inputs)
        hf = transformers_ssd(inputs)
        if hf is None:
            print("transformers does not import here: its row is left out (pip install -e .[bench])")
        else:
            cases["transformers torch"], saved["transformers torch"] = ssd_case(hf, inputs)
        mamba1 = make_inputs(batch, nheads * headdim, length, 16, device, dtype)
        label = f"mamba-1 {mamba1_impl} (d_state 16)"
        cases[label], saved[label] = scan_case(mamba1_impl, mamba1)
        results = measure(cases, args.rounds, args.repeats, device)
        medians = {impl: (statistics.median(f), statistics.median(fb)) for impl, (f, fb, _) in results.items()}
        for impl, (forward_times, forward_backward_times, peak) in results.items():
            fwd, fwd_bwd = medians[impl]

            def ratio(base):
                return f"{medians[base][0] / fwd:.2f}x / {medians[base][1] / fwd_bwd:.2f}x" if base in medians else "-"
            peak_mb = "-" if peak is None else f"{peak / 2**20:.0f}"
            print(f"| {(batch, nheads, headdim, d_state, length)} | {impl} | {fwd * 1e3:.2f} ({min(forward_times) * 1e3:.2f}) | "
                  f"{fwd_bwd * 1e3:.2f} ({min(forward_backward_times) * 1e3:.2f}) | {saved[impl] / 2**20:.1f} | {peak_mb} | "
                  f"{ratio('transformers torch')} | {ratio(label)} |", flush=True)
    print("times: median (best) of every timed call; ratios: forward / forward+backward, of the medians, "
          "measured in this run (above 1: this row is faster)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", nargs="+", help="batch,channels,length,d_state (default: sized for the device)")
    parser.add_argument("--impls", nargs="+", help="default: every implementation that runs on the device")
    parser.add_argument("--rounds", type=int, default=5, help="turns each implementation takes (interleaved)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per implementation per round")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--document-length", type=int, default=256,
                        help="mean length of the packed documents of the '+ documents' rows (0: no such rows)")
    parser.add_argument("--max-reference-length", type=int, default=4096,
                        help="skip the sequential reference above this length (it is slow by design)")
    parser.add_argument("--tables", nargs="+", default=["mamba", "mamba2"], choices=["mamba", "mamba2"])
    parser.add_argument("--ssd-shapes", nargs="+", help="batch,nheads,headdim,d_state,length (default: sized for the device)")
    parser.add_argument("--ssd-impls", nargs="+", help="default: every SSD implementation that runs on the device")
    parser.add_argument("--max-ssd-reference-length", type=int, default=512,
                        help="skip the sequential SSD reference above this length")
    args = parser.parse_args()
    keep_freed_memory()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    other_device = "cpu" if device.type == "cuda" else "cuda"
    impls = args.impls or [i for i in SCAN_IMPL_CHOICES if i not in ("auto", other_device)]
    for impl in impls:
        reason = kernel_build.unavailable(impl) if impl in kernel_build.SOURCES else None
        if reason is not None:
            raise SystemExit(f"error: impl {impl} is unavailable: {reason}")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {name}, dtype {args.dtype}, {args.rounds} interleaved rounds x {args.repeats} calls")
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    if bandwidth:
        print(f"device copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    if "mamba" in args.tables:
        mamba_table(args, device, dtype, impls, bandwidth)
    if "mamba2" in args.tables:
        other = "cpu" if device.type == "cuda" else "cuda"
        ssd_impls = args.ssd_impls or [i for i in SSD_IMPL_CHOICES if i not in ("auto", other)]
        ssd_table(args, device, dtype, ssd_impls)

if __name__ == "__main__":
    main()
