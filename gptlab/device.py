"""Device choice, mixed precision and the hardware's matmul peak (the denominator of MFU)."""
from __future__ import annotations

import contextlib
import json
import time

import torch

from gptlab.io import atomic_write_json, gptlab_home

# Dense bf16 tensor-core peaks (FLOP/s) of common accelerators, for MFU on GPUs.
KNOWN_GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPUs without fast bf16 gain nothing)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure_matmul_peak(device: torch.device, n: int = 1024, seconds: float = 1.0) -> float:
    """Achieved FLOP/s of a large square matmul: fp32 on CPU, bf16 on GPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # A private generator: measuring must not shift the global RNG (dropout) of a training run.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def matmul_peak(device: torch.device, refresh: bool = False) -> float:
    """The peak used for MFU: a known datasheet figure for GPUs, else measured once and cached."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in KNOWN_GPU_PEAKS.items():
            if key in name:
                return peak
    cache = gptlab_home() / "matmul_peak.json"
    key = f"{device.type}-threads{torch.get_num_threads()}"
    data = {}
    if cache.is_file():
        try:
            data = json.loads(cache.read_text())
        except (OSError, ValueError):
            data = {}
    if refresh or key not in data:
        data[key] = measure_matmul_peak(device)
        atomic_write_json(cache, data)
    return float(data[key])
