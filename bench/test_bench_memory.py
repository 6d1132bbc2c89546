"""Optimizer memory: bytes of state per parameter, measured from the allocated state."""

import torch

from .common import make_params, make_step, state_bytes
from .shapes import MODELS, MODELS_CI
from .timing import environment


def test_state_bytes_per_param(benchmark, bench_device, bench_size, impl):
    model = "gpt2-small" if bench_size == "full" else "gpt2-tiny"
    specs = (MODELS if bench_size == "full" else MODELS_CI)[model]
    dtype = torch.bfloat16 if bench_device.type == "cuda" else torch.float32
    matrices, others = make_params(specs, bench_device, dtype)
    step, opts = make_step(impl, matrices, others)
    before = torch.cuda.memory_allocated(bench_device) if bench_device.type == "cuda" else None
    step()
    n = sum(p.numel() for p in matrices + others)
    measured = state_bytes(opts)
    per_param = measured / n
    # The matrix rules keep one fp32 momentum (4 B/param) plus small vectors; AdamW two.
    expected_floor = 8.0 if impl in ("adamw", "torch-adamw") else 4.0
    if dtype == torch.bfloat16 and impl.startswith("torch"):
        expected_floor /= 2  # torch.optim keeps state in the param dtype
    assert per_param >= expected_floor * 0.5
    info = {"suite": "memory", "case": model, "impl": impl, "dtype": str(dtype), "params": n,
            "state_bytes": measured, "state_bytes_per_param": per_param}
    info.update(environment(bench_device))
    if before is not None:
        info["cuda_allocated_delta"] = torch.cuda.memory_allocated(bench_device) - before
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: None, rounds=1)
