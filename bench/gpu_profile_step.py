"""One optimizer step under torch.profiler: device time per kernel, for the table of where a
step's time goes, each kernel beside its floor.

    python bench/gpu_profile_step.py --out profile.json                 # GPT-2 small, TrasMuon
    python bench/gpu_profile_step.py --interpret-smoke --out p.json     # CPU dry run

The step is the Triton backend's (bf16 params, bench/shapes.py's structure, bench/common.py's
``make_step``), profiled after two warm-up steps (the plan is built and every kernel compiled
in the first). Per kernel name: calls, total and mean device time, and the share of the
step's device time; the JSON is written as soon as the table is made.

Floors (``floor_us``, ``fraction_of_floor`` = floor / time, per kernel row where one is
defined; ``kernel_floors``): the memory passes at the bytes they must read and write (per
matrix element bench/gpu_memory_passes.py's ``KERNEL_BYTES``, per AdamW element 22) at the
device-to-device copy bandwidth, the Newton-Schulz products at their symmetric FLOPs (5 steps,
bench/timing.py's ``ns_flops``: the Gram and polynomial products in ``_sym_gram_kernel``, the
update product B X in ``_ns_apply_kernel``) at the bf16 matmul rate, both rates measured in
the same run (``rates``). Kernels that touch only per-row or per-column vectors (finalize,
row statistics, gate) and torch's own have no floor.

On the CPU (``--interpret-smoke``, Triton's interpreter) the profiler does not see the Triton
kernels: the rows come from the launches the step issues (trasmuon_kernels._launch), timed
by the host clock from one launch to the next, and the floors use fixed stand-in rates
(``rates["source"] == "stand-in"``). Those times and floors mean nothing; the run only checks
the script, the matching of kernels to floors included.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NS_STEPS = 5
ADAMW_BYTES = 2 + 2 + 2 + 4 + 4 + 4 + 4  # bf16 p read + written, g read; fp32 m, v read + written
STAND_IN_RATES = {"matmul_tflops": 1.0, "copy_gbs": 10.0}
# A launch that carries a short name of its own -> its kernel's (what a GPU profile shows).
KERNEL_OF_LAUNCH = {"adamw": "_adamw_kernel"}


def kernel_floors(specs, matmul_tflops: float, copy_gbs: float) -> dict[str, dict]:
    """Kernel name -> its floor over one step of the model ``specs``: ``floor_bytes`` or
    ``floor_flops``, and ``floor_us`` at the given rates (see the module docstring)."""
    from bench.gpu_memory_passes import KERNEL_BYTES
    from bench.timing import ns_flops

    matrix_elems = other_elems = gram_flops = apply_flops = 0
    for shape, count, kind in specs:
        n = 1
        for dim in shape:
            n *= dim
        if kind != "matrix":
            other_elems += count * n
            continue
        matrix_elems += count * n
        rows, cols = shape[-2:]
        d, k = min(rows, cols), max(rows, cols)
        # (B X is never symmetric: ns_flops' last term; the rest is the Gram and polynomial)
        apply = n // (rows * cols) * NS_STEPS * 2 * d * d * k
        apply_flops += count * apply
        gram_flops += count * (ns_flops(shape, NS_STEPS, symmetric=True) - apply)
    floors = {name: {"floor_bytes": per_elem * matrix_elems} for name, per_elem in KERNEL_BYTES.items()}
    floors["_adamw_kernel"] = {"floor_bytes": ADAMW_BYTES * other_elems}
    floors["_sym_gram_kernel"] = {"floor_flops": gram_flops}
    floors["_ns_apply_kernel"] = {"floor_flops": apply_flops}
    for floor in floors.values():
        floor["floor_us"] = (floor["floor_bytes"] / (copy_gbs * 1e9) if "floor_bytes" in floor
                             else floor["floor_flops"] / (matmul_tflops * 1e12)) * 1e6
    return floors


def match_floor(kernel: str, floors: dict[str, dict]) -> str | None:
    """The key of ``floors`` that profiler row name ``kernel`` is (a whole identifier within
    it: a compiled kernel's name may carry decorations), or None."""
    for name in floors:
        if re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", kernel):
            return name
    return None


def interpreter_rows(step, steps: int) -> list[dict]:
    """Rows from the launches of ``steps`` calls of ``step`` (Triton's interpreter, where the
    profiler sees no kernel): host time from each launch to the next (or the step's end)."""
    from trasmuon_kernels import _launch

    marks: list[tuple[str, float]] = []
    observe = lambda rec: marks.append((KERNEL_OF_LAUNCH.get(rec.name, rec.name), time.perf_counter()))
    # (record_launches collects names only: the timing needs an observer of our own)
    with _launch.observe_launches(observe):
        ends = []
        for _ in range(steps):
            step()
            ends.append(len(marks))
            marks.append(("", time.perf_counter()))
    totals: dict[str, list[float]] = {}
    for i, (name, t) in enumerate(marks):
        if i in ends or not name:
            continue
        calls_us = totals.setdefault(name, [0, 0.0])
        calls_us[0] += 1
        calls_us[1] += (marks[i + 1][1] - t) * 1e6
    return [{"kernel": name, "calls_per_step": calls / steps, "us_per_step": us / steps}
            for name, (calls, us) in totals.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--impl", default="trasmuon-triton")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (the table is per step)")
    ap.add_argument("--interpret-smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton or the kernels are imported
    sys.path.insert(0, str(ROOT))
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.common import SMOKE_MODEL, SMOKE_SPECS, make_params, make_step
    from bench.shapes import MODELS
    from bench.timing import copy_bandwidth_gbs, environment, matmul_tflops, write_json

    models = dict(MODELS, **{SMOKE_MODEL: SMOKE_SPECS})
    if args.interpret_smoke:
        device, model = torch.device("cpu"), SMOKE_MODEL
    elif not torch.cuda.is_available():
        ap.error("needs a GPU (or --interpret-smoke)")
    else:
        device, model = torch.device("cuda"), args.model
    matrices, others = make_params(models[model], device, torch.bfloat16)
    step, _ = make_step(args.impl, matrices, others)
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        if device.type == "cuda":
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        else:  # the same steps, their launches timed one by one
            launch_rows = interpreter_rows(step, args.steps)
    rows = []
    for event in prof.key_averages():
        # On a GPU only the kernels themselves (a CPU op's device time repeats its kernels').
        if device.type == "cuda" and "CUDA" not in str(getattr(event, "device_type", "")):
            continue
        us = getattr(event, "device_time_total", 0) if device.type == "cuda" else event.self_cpu_time_total
        if us <= 0:
            continue
        rows.append({"kernel": event.key, "calls_per_step": event.count / args.steps,
                     "us_per_step": us / args.steps})
    result = {"env": environment(device), "model": model, "impl": args.impl,
              "interpret_smoke": bool(args.interpret_smoke)}
    if device.type == "cuda":
        rates = {"matmul_tflops": matmul_tflops(device), "copy_gbs": copy_bandwidth_gbs(device),
                 "source": "measured"}
    else:  # the profiler's host ops stay in the JSON; the kernel rows come from the launches
        result["host_ops"] = rows
        rows = launch_rows
        rates = dict(STAND_IN_RATES, source="stand-in",
                     note="interpreter dry run: no rates measured, these floors mean nothing")
    result["rates"] = rates
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows) or 1.0
    floors = kernel_floors(models[model], rates["matmul_tflops"], rates["copy_gbs"])
    for r in rows:
        r["share"] = r["us_per_step"] / total
        name = match_floor(r["kernel"], floors)
        if name is not None:
            r.update(floors[name])
            r["fraction_of_floor"] = r["floor_us"] / r["us_per_step"]
    floored = [r for r in rows if "floor_us" in r]
    result.update(device_us_per_step=total, floor_us_per_step=sum(r["floor_us"] for r in floored),
                  kernels=rows)
    write_json(args.out, result)
    print(f"{model} {args.impl}: {total:.0f} us of {'device' if device.type == 'cuda' else 'host'} time per step; "
          f"floors ({rates['source']} rates: {rates['matmul_tflops']:.0f} TFLOP/s, {rates['copy_gbs']:.0f} GB/s) "
          f"for {len(floored)} kernels")
    for r in rows[:25]:
        floor = f" floor {r['floor_us']:9.1f} us ({r['fraction_of_floor']:5.0%})" if "floor_us" in r else ""
        print(f"  {r['kernel'][:60]:60s} {r['calls_per_step']:6.1f} x {r['us_per_step']:10.1f} us "
              f"{r['share']:6.1%}{floor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
