"""One optimizer step under torch.profiler: device time per kernel, for the table of where a
step's time goes.

    python bench/gpu_profile_step.py --out profile.json                 # GPT-2 small, TrasMuon
    python bench/gpu_profile_step.py --interpret-smoke --out p.json     # CPU dry run

The step is the Triton backend's (bf16 params, bench/shapes.py's structure, bench/common.py's
``make_step``), profiled after two warm-up steps (the plan is built and every kernel compiled
in the first). Per kernel name: calls, total and mean device time, and the share of the
step's device time; the JSON is written as soon as the table is made. On the CPU (Triton's
interpreter) the times are host times and mean nothing; the run only checks the script.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    from bench.timing import environment, write_json

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
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
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
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["us_per_step"] / total
    result = {"env": environment(device), "model": model, "impl": args.impl,
              "interpret_smoke": bool(args.interpret_smoke), "device_us_per_step": total, "kernels": rows}
    write_json(args.out, result)
    print(f"{model} {args.impl}: {total:.0f} us of {'device' if device.type == 'cuda' else 'host'} time per step")
    for r in rows[:25]:
        print(f"  {r['kernel'][:60]:60s} {r['calls_per_step']:6.1f} x {r['us_per_step']:10.1f} us {r['share']:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
