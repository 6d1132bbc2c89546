"""The whole optimizer step, per implementation, on real models' parameter sets."""

import torch

from .common import make_params, make_step
from .shapes import MODELS, MODELS_CI
from .timing import environment, median_ms


def test_optimizer_step(benchmark, bench_device, bench_size, quick, impl, model):
    models = MODELS if bench_size == "full" else MODELS_CI
    dtype = torch.bfloat16 if bench_device.type == "cuda" else torch.float32
    matrices, others = make_params(models[model], bench_device, dtype)
    step, _ = make_step(impl, matrices, others)
    ms = median_ms(step, bench_device, quick=quick)
    assert ms > 0
    n_params = sum(p.numel() for p in matrices + others)
    benchmark.extra_info.update(environment(bench_device), suite="step", case=model, impl=impl,
                                dtype=str(dtype), params=n_params, median_ms=ms)
    sync = torch.cuda.synchronize if bench_device.type == "cuda" else (lambda: None)
    benchmark.pedantic(lambda: (step(), sync()), rounds=1 if quick else 10, warmup_rounds=0 if quick else 2)
