"""Timing that measures the device, not the launch: GPU work is timed with CUDA events via
``triton.testing.do_bench`` (median), CPU work with a host clock; both after warm-up."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def write_json(path: Path | None, result: Any) -> None:
    """Write a result file (nothing when ``path`` is None): scripts call it as they go, so
    that a run cut off keeps what it measured."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")


def median_ms(fn: Callable[[], object], device: torch.device | str, *, quick: bool = False) -> float:
    """Median time of ``fn()`` in milliseconds after warm-up."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        # do_bench's warmup and rep are in milliseconds of GPU time.
        return float(do_bench(fn, warmup=10 if quick else 50, rep=20 if quick else 200,
                              return_mode="median"))
    warmup, reps = (1, 3) if quick else (3, 15)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbs(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Achieved device-to-device copy bandwidth (bytes read + written per second, in GB/s)."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device | str, quick: bool = False) -> float:
    """The achieved bf16 matmul rate in TFLOP/s: one n^3 product (n = 8192 on a GPU, 256 on
    the CPU) timed with ``median_ms``."""
    device = torch.device(device)
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = median_ms(lambda: torch.mm(a, b), device, quick=quick)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def ns_flops(shape: tuple[int, ...], steps: int, symmetric: bool) -> int:
    """FLOPs of ``steps`` NS steps on a stack of (m, n) matrices, d = min, k = max:
    per step X X^T (2 d^2 k, or d(d+1) k for the upper triangle), A A (2 d^3, or
    d^2 (d+1)) and B X (2 d^2 k, never symmetric)."""
    *lead, m, n = shape
    batch = 1
    for s in lead:
        batch *= s
    d, k = min(m, n), max(m, n)
    gram = d * (d + 1) * k if symmetric else 2 * d * d * k
    poly = d * d * (d + 1) if symmetric else 2 * d**3
    return batch * steps * (gram + poly + 2 * d * d * k)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def environment(device: torch.device | str) -> dict[str, str]:
    """What every results file records: device, driver, torch and triton versions."""
    import triton

    env = {"device": device_name(device), "torch": torch.__version__, "triton": triton.__version__}
    if torch.device(device).type == "cuda":
        env["cuda"] = str(torch.version.cuda)
        try:
            import subprocess

            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            env["driver"] = "unknown"
    return env
