"""Building the fused kernels of `kernels/` on first use: compiled for this machine only, cached
by a hash of everything that goes into the build, loaded in about a second afterwards.

    reason = unavailable("cpu")     # None once lethe_cpu's ops are loaded (built first if needed); "conv_cpu", "cuda" alike
    python -m lethe.ops.kernel_build    # `make kernels`: build every kernel this machine can run

Each library is compiled with torch.utils.cpp_extension + ninja (-march=native on the CPU; the
local GPU's architecture on CUDA) into kernels/build/<name>/, where the name hashes the sources,
headers, flags and the torch, Python and CPU or CUDA versions: a changed source rebuilds, an
unchanged one loads. A failed build warns once (with the first compiler error and the log's
path) and never breaks an import; callers fall back to the PyTorch scan. torch.compile calls
`unavailable` while it traces (lethe.ops.selective_scan marks it a constant), which builds the
kernel then, outside the traced graph.
"""

import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

KERNEL_DIR = Path(__file__).resolve().parents[3] / "kernels"
BUILD_DIR = Path(os.environ.get("LETHE_KERNEL_BUILD_DIR", KERNEL_DIR / "build"))
SOURCES = {
    "cpu": ["selective_scan_cpu.cpp"],
    # the causal depthwise conv1d (ops/causal_conv1d.py); CUDA tensors take the causal-conv1d package
    "conv_cpu": ["causal_conv1d_cpu.cpp"],
    "cuda": ["selective_scan_cuda_binding.cpp", "selective_scan_cuda.cu"],
    # the CUDA kernels' source run on CPU threads (kernels/cuda_emulation.h), float32 only: how
    # the tests check the CUDA algorithm on machines without a GPU
    "cuda_emulated": ["selective_scan_cuda_binding.cpp", "cuda_emulation.cpp"],
    # Mamba-2's SSD scan (ops/ssd.py), the same three ways
    "ssd_cpu": ["ssd_cpu.cpp"],
    "ssd_cuda": ["ssd_cuda_binding.cpp", "ssd_cuda.cu"],
    "ssd_cuda_emulated": ["ssd_cuda_binding.cpp", "ssd_cuda_emulation.cpp"],
}
# how each library is compiled: for this CPU, for the local GPU, or CUDA source emulated on CPU threads
TOOLCHAIN = {"cpu": "cpu", "conv_cpu": "cpu", "ssd_cpu": "cpu", "cuda": "cuda", "ssd_cuda": "cuda",
             "cuda_emulated": "emulated", "ssd_cuda_emulated": "emulated"}
# what each library is, and what runs without it: for the one-line messages
DESCRIPTIONS = {"cpu": ("cpu scan", "the PyTorch scan"), "cuda": ("cuda scan", "the PyTorch scan"),
                "cuda_emulated": ("emulated cuda scan", "nothing (tests only)"), "conv_cpu": ("cpu causal-conv1d", "F.conv1d"),
                "ssd_cpu": ("cpu SSD scan", "the chunked PyTorch SSD scan"),
                "ssd_cuda": ("cuda SSD scan", "the chunked PyTorch SSD scan"),
                "ssd_cuda_emulated": ("emulated cuda SSD scan", "nothing (tests only)")}
STALE_LOCK_S = 600  # a build lock older than this was left by a killed build

_status: dict[str, str | None] = {}  # device type -> None (loaded) or why the kernel is unavailable


def _native_flags() -> list[str]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return ["-march=native"]
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return []


def _cpu_fingerprint() -> str:
    """What -march=native compiles for: a build cache shared by different CPUs must not mix them."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return platform.processor()


def _build_options(device_type: str) -> dict:
    if TOOLCHAIN[device_type] == "cpu":
        return dict(extra_cflags=["-O3", "-fopenmp", *_native_flags()], extra_ldflags=["-fopenmp"])
    if TOOLCHAIN[device_type] == "emulated":
        return dict(extra_cflags=["-O1", "-DLETHE_CUDA_EMULATION", f"-I{KERNEL_DIR}"], with_cuda=False)
    arch = "".join(map(str, torch.cuda.get_device_capability()))
    return dict(
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
        with_cuda=True,
    )


def _library_name(device_type: str, options: dict) -> str:
    digest = hashlib.sha256()
    for path in [*(KERNEL_DIR / source for source in SOURCES[device_type]), *sorted(KERNEL_DIR.glob("*.h"))]:
        digest.update(path.read_bytes())
    extra = torch.version.cuda if TOOLCHAIN[device_type] == "cuda" else _cpu_fingerprint()
    digest.update(f"{options}|{torch.__version__}|{sys.version_info[:2]}|{extra}".encode())
    return f"lethe_{device_type}_{digest.hexdigest()[:12]}"


def _ensure_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the pip package's binary is not there unless the
    virtualenv is activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def _build(device_type: str) -> None:
    """Compile (or load the cached build of) one kernel library into torch.ops.lethe_<device>."""
    from torch.utils.cpp_extension import load

    _ensure_ninja_on_path()
    options = _build_options(device_type)
    if TOOLCHAIN[device_type] == "cuda":  # cpp_extension would otherwise add every visible GPU's architecture
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ".".join(map(str, torch.cuda.get_device_capability())))
    name = _library_name(device_type, options)
    build_dir = BUILD_DIR / name
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)  # otherwise every later build would wait on it forever
    fresh = not any(build_dir.glob(f"{name}*.so"))
    if fresh:
        print(f"lethe: building the fused {DESCRIPTIONS[device_type][0]} kernel for this machine (first use only; "
              "`make kernels` builds ahead)...", file=sys.stderr, flush=True)
    sources = [str(KERNEL_DIR / source) for source in SOURCES[device_type]]
    load(name=name, sources=sources, build_directory=str(build_dir), is_python_module=False, verbose=False, **options)


def unavailable(device_type: str) -> str | None:
    """None when the fused kernel for `device_type` is loaded (building it on first call), else
    why it cannot run, in a few words. A failed build warns once, with the log's location."""
    if device_type in _status:
        return _status[device_type]
    reason = None
    if device_type not in SOURCES:
        reason = f"there is no fused kernel for {device_type} tensors"
    elif os.environ.get("LETHE_DISABLE_KERNELS"):
        reason = "disabled by LETHE_DISABLE_KERNELS"
    elif not (KERNEL_DIR / SOURCES[device_type][0]).is_file():
        reason = f"its sources are not in {KERNEL_DIR} (install Lethe from a clone: pip install -e .)"
    elif TOOLCHAIN[device_type] == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device is available"
    else:
        try:
            _build(device_type)
        except Exception as exc:  # a compiler or toolchain problem: report it, never break the import
            log = BUILD_DIR / f"build-{device_type}.log"
            BUILD_DIR.mkdir(parents=True, exist_ok=True)
            log.write_text(str(exc))
            lines = [line.strip() for line in str(exc).splitlines()]
            # the compiler's own "file:line: error: ..." before torch's "Error building extension"
            first = next((line for line in lines if ": error:" in line), None) or next(
                (line for line in lines if "error" in line.lower()), str(exc).strip()[-200:])
            reason = f"its build failed ({first[:200]}); full log in {log}"
            name, fallback = DESCRIPTIONS[device_type]
            warnings.warn(f"lethe: the fused {name} kernel is unavailable, using {fallback}: {reason}",
                          stacklevel=2)
    _status[device_type] = reason
    return reason


def prepare() -> dict[str, str | None]:
    """Build or load the kernels for every device this machine has; returns `unavailable` of each.
    `make kernels` runs it ahead of first use."""
    devices = ["cpu", "conv_cpu", "ssd_cpu"] + (["cuda", "ssd_cuda"] if torch.cuda.is_available() else [])
    return {device_type: unavailable(device_type) for device_type in devices}


def main() -> None:
    """Build (or load) every kernel this machine can run and say which are ready."""
    start = time.perf_counter()
    status = prepare()
    for device_type, reason in status.items():
        print(f"{device_type}: " + ("ready" if reason is None else f"unavailable: {reason}"))
    print(f"({time.perf_counter() - start:.1f} s)")
    if "cuda" not in status:
        print("cuda: no CUDA device here (the CUDA sources are compile-checked by the test suite when nvcc is present)")
    sys.exit(0 if all(reason is None for reason in status.values()) else 1)


if __name__ == "__main__":
    main()
