"""Device choice, mixed precision and the hardware's matmul peak (the denominator of MFU)."""
from __future__ import annotations

import contextlib
import ctypes
import json
import platform
import sys
import time

import torch

from gptlab.io import atomic_write_json, gptlab_home

# Dense bf16 tensor-core peaks (FLOP/s) of common accelerators, for MFU on GPUs.
KNOWN_GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple's MPS, then the CPU; any other name as torch spells it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def hardware_name(device: torch.device) -> str:
    """What the figures were measured on: the GPU's name, or the CPU model and the vector ISA PyTorch's
    kernels use. The same training step reaches about half of the measured matmul peak on one CPU and
    60% on another, so a figure without its hardware cannot be compared."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS, {platform.machine()}"
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{model or platform.processor() or platform.machine()}, {isa}"


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision a device trains and evaluates in, or None for plain fp32.

    bf16 on CUDA GPUs that have it (Ampere and later). Older GPUs and Apple's MPS stay in fp32: their
    fast half type is fp16, whose narrow range needs loss scaling, which the training loop does not
    do. CPUs stay in fp32 too (without AMX, bf16 matmuls are no faster there)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device):
    """Autocast to ``autocast_dtype(device)``, or nothing where that is fp32."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings on GPUs and MPS measure nothing otherwise)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def describe_device(device: torch.device) -> str:
    """One line for logs: the device, its hardware, and the precision training runs in."""
    dtype = autocast_dtype(device)
    return f"{device} ({hardware_name(device)}; {'bf16 autocast' if dtype is not None else 'fp32'})"


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> None:
    """Keep freed tensor memory in the process instead of handing it back to the kernel.

    PyTorch's CPU allocator is plain malloc. glibc serves blocks above 128 KB with fresh mmap
    pages and returns them on free, so every large activation of every step is page-faulted in
    again: thousands of page faults per step at the tiny training shape. Raising
    the mmap and trim thresholds (what jemalloc/tcmalloc users get for free) makes those blocks
    reusable. Linux/glibc only; a no-op elsewhere.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or not sys.platform.startswith("linux"):
        return
    _ALLOCATOR_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)    # glibc's maximum on 64-bit
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):   # not glibc (musl, ...): keep the defaults
        pass


def measure_matmul_peak(device: torch.device, n: int = 1024, seconds: float = 1.0) -> float:
    """Achieved FLOP/s of a large square matmul: fp32 on CPU, bf16 on GPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # A private generator: measuring must not shift the global RNG (dropout) of a training run.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    synchronize(device)
    # The best of several short bursts: a peak is what the hardware can do, and on a shared machine
    # one long average mostly measures the neighbours.
    best, bursts = 0.0, 5
    for _ in range(bursts):
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / bursts:
            a @ b
            iters += 1
            synchronize(device)
        best = max(best, 2 * n ** 3 * iters / (time.perf_counter() - t0))
    return best


def matmul_peak(device: torch.device, refresh: bool = False, at_least: float = 0.0) -> float:
    """The peak used for MFU: a known datasheet figure for GPUs, else measured once and cached.

    ``at_least`` is a rate the hardware was just seen to achieve. A cached peak below it was read while
    other work held the machine (or before its clock rose), and dividing by it is how a fresh machine
    showed mfu=163%: such a peak is measured again, and never kept below what was achieved.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in KNOWN_GPU_PEAKS.items():
            if key in name:
                return max(peak, at_least)
    cache = gptlab_home() / "matmul_peak.json"
    key = f"{device.type}-threads{torch.get_num_threads()}"
    data = {}
    if cache.is_file():
        try:
            data = json.loads(cache.read_text())
        except (OSError, ValueError):
            data = {}
    cached = data.get(key)
    if not isinstance(cached, (int, float)) or isinstance(cached, bool) or not cached > 0:
        cached = 0.0
    if refresh or cached <= 0 or cached < at_least:
        # Keep the highest reading ever seen: a reading taken while other jobs ran is too low and
        # would inflate every MFU after it (a refresh can raise the cached peak, never lower it).
        data[key] = max(measure_matmul_peak(device), float(cached), float(at_least))
        atomic_write_json(cache, data)
        cached = data[key]
    return float(cached)
