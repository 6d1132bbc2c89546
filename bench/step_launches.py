"""Device launches and host time of one optimizer step on the Triton backend, counted on the
CPU under Triton's interpreter, for a model's parameter structure with small dimensions.

    python bench/step_launches.py --model gpt2-small --json bench/results/step_launches_cpu.json

What is counted, after two warm-up steps (the plan is built in the first):

* Triton launches: every ``Launch`` the step issues (``record_launches``), by kernel;
* other device operations: every ``TorchLaunch`` (a copy, a reduction over partials) and every
  ATen operation the step runs outside them (a ``TorchDispatchMode`` that counts operations
  which touch data: views and metadata queries are not launches);
* host time: the median wall time of the step with every launch stubbed out
  (``stub_launches``), i.e. what the Python side costs per step before any CUDA graph.

The structure is the model's (same number of matrices per shape, same non-matrix params) with
its dimensions divided by ``--shrink`` so that the interpreter can run it; params bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import OURS, make_params  # noqa: E402
from bench.shapes import MODELS  # noqa: E402

# ATen operations that do not launch anything: views, metadata, and the dispatch of a copy's
# destination allocation.
_NOT_LAUNCHES = {"view", "_unsafe_view", "as_strided", "t", "transpose", "select", "slice",
                 "detach", "alias", "expand", "unsqueeze", "squeeze", "reshape", "permute",
                 "empty", "empty_strided", "empty_like", "lift_fresh", "_to_copy_meta",
                 "is_same_size", "sym_size", "sym_stride", "sym_numel", "unbind", "split",
                 "_local_scalar_dense", "item",
                 # torch.optim's profiler annotations of every step: markers, not launches
                 "_record_function_enter_new", "_record_function_exit"}


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NOT_LAUNCHES:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def shrunk(specs, shrink: int) -> list:
    """The model's parameter structure with every dimension divided by ``shrink`` (kept >= 8),
    so that matrices stay matrices and the counts per shape stay the model's."""
    out = []
    for shape, count, kind in specs:
        out.append((tuple(max(8, d // shrink) if d > 1 else d for d in shape), count, kind))
    return out


def build(model: str, rule: str, shrink: int, dtype: torch.dtype, seed: int = 0):
    matrices, others = make_params(shrunk(MODELS[model], shrink), "cpu", dtype, seed)
    groups = [{"params": matrices}, {"params": others, "rule": "adamw"}]
    if rule == "adamw":
        groups = [{"params": matrices + others}]
    opt = OURS[rule](groups, lr=1e-3, backend="triton")
    return opt, matrices + others


def count_step(opt) -> dict[str, Any]:
    from trasmuon_kernels._launch import record_launches, stub_launches

    with record_launches() as records, stub_launches(), _CountOps() as ops:
        opt.step()
    triton_launches = Counter(r.name for r in records if not r.name.startswith("torch:"))
    torch_launches = Counter(r.name for r in records if r.name.startswith("torch:"))
    adamw = sum(n for k, n in triton_launches.items() if "adamw" in k)
    return {
        "triton": sum(triton_launches.values()), "triton_by_kernel": dict(triton_launches),
        "torch_launch": sum(torch_launches.values()), "torch_launch_by_name": dict(torch_launches),
        "aten_outside_launches": sum(ops.ops.values()), "aten_by_op": dict(ops.ops),
        "total": sum(triton_launches.values()) + sum(torch_launches.values()) + sum(ops.ops.values()),
        "adamw_triton_launches": adamw,
    }


def host_ms(opt, steps: int) -> float:
    from trasmuon_kernels._launch import stub_launches

    samples = []
    with stub_launches():
        for _ in range(steps):
            start = time.perf_counter()
            opt.step()
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small", choices=sorted(MODELS))
    parser.add_argument("--rules", nargs="+", default=list(OURS), choices=list(OURS))
    parser.add_argument("--shrink", type=int, default=16,
                        help="divide every dimension by this (the interpreter runs the warm-up)")
    parser.add_argument("--host-steps", type=int, default=50)
    parser.add_argument("--stub-warmup", action="store_true",
                        help="stub the warm-up steps' launches too (for --shrink 1: the plan is "
                             "built, nothing is run; launch counts are then not measured)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import platform

    import triton

    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "model": args.model, "shrink": args.shrink, "param_dtype": "bfloat16",
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "rules": {},
    }
    from trasmuon_kernels._launch import stub_launches

    for rule in args.rules:
        opt, _ = build(args.model, rule, args.shrink, torch.bfloat16)
        if args.stub_warmup:
            with stub_launches():
                opt.step()  # builds the plan
            counts: dict[str, Any] = {}
        else:
            opt.step()  # builds the plan
            opt.step()
            counts = count_step(opt)
        counts["host_ms_per_step_stubbed"] = host_ms(opt, args.host_steps)
        counts["buckets"] = [
            {"rule": b.rule.name, "count": b.count, "shape": list(b.shape), "backend": b.backend}
            for b in opt._plan.buckets]
        result["rules"][rule] = counts
        launches = "" if args.stub_warmup else (
            f"{counts['total']:4d} device launches per step ({counts['triton']} Triton, "
            f"{counts['torch_launch']} torch, {counts['aten_outside_launches']} other aten; "
            f"AdamW {counts['adamw_triton_launches']}); ")
        print(f"{rule:>9}: {launches}host {counts['host_ms_per_step_stubbed']:.3f} ms per step "
              "with launches stubbed")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
