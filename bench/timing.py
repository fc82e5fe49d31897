"""What the benchmarks share: how they time (implementations take turns, round by round, each
with an untimed warm-up call; medians of every timed call) and how they count memory.

Why take turns: on a shared machine a 15 ms measurement taken in one burst can fall in a slow
stretch that a 500 ms one averages over; interleaved, every implementation sees the same noisy
minutes. Freed memory stays in the process (keep_freed_memory), so no one is timed for page faults.
"""

import ctypes
import sys
import time

import torch


def keep_freed_memory():
    """glibc hands big freed blocks back to the OS, and the next call page-faults them in again:
    the chunked scan's ~30 MB of temporaries made its time swing between 50 and 95 ms with
    whatever else had run in the process. Freed memory stays in the process instead (as with the
    CUDA caching allocator, and the kernel's own output pool), so each implementation is timed
    for its work, not for page faults."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: blocks up to 32 MB come from the heap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # and the heap is not trimmed below 1 GB of free space


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def elapsed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def best_time(fn, repeats, device):
    return min(elapsed(fn, device) for _ in range(repeats))


def saved_bytes(fn):
    """Bytes autograd keeps for backward (tensors, counted once each)."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def random_document_starts(batch, length, mean_length, device):
    """(batch, length) bool: documents of random lengths (mean `mean_length`) packed into each row."""
    starts = torch.rand(batch, length, generator=torch.Generator().manual_seed(2)) < 1 / mean_length
    starts[:, 0] = True
    return starts.to(device)


def measure(cases: dict, rounds: int, repeats: int, device) -> dict:
    """cases: {name: (fn, ...)} -> {name: ([seconds of fn_0], ..., CUDA peak bytes of the last fn
    or None)}: every timed call, the cases taking turns round by round."""
    results = {name: [[] for _ in fns] + [None] for name, fns in cases.items()}
    for _ in range(rounds):
        for name, fns in cases.items():
            for fn in fns:
                fn()  # warm-up: caches (and a kernel build on first use)
            for i, fn in enumerate(fns):
                last = i == len(fns) - 1
                if last and device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                results[name][i] += [elapsed(fn, device) for _ in range(repeats)]
                if last and device.type == "cuda":
                    results[name][-1] = max(results[name][-1] or 0, torch.cuda.max_memory_allocated() - base)
    return results
