"""One whole optimizer step on a GPU: ours on the Triton backend against torch.optim.Muon
(+ fused AdamW for the non-matrix params) and against our eager backend.

    python bench/gpu_step.py --out step.json                       # GPT-2 small, Qwen3-0.6B
    python bench/gpu_step.py --models gpt2-small --impls trasmuon-triton,torch-muon

The parameter sets are bench/shapes.py's (bf16 params and grads, random values), the steps
bench/common.py's ``make_step``. Each implementation takes one step untimed first (Triton
compiles its kernels there; the time is recorded as ``first_step_s``), then the median of
``triton.testing.do_bench`` (bench/timing.py). An implementation that fails, or runs past
``--budget-s`` for its model, is reported with its error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("gpt2-small", "qwen3-0.6b")
DEFAULT_IMPLS = ("trasmuon-triton", "trasmuon", "torch-muon", "normuon-triton", "muon-triton")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--impls", default=",".join(DEFAULT_IMPLS))
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="skip the remaining implementations of a model after this many seconds")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.common import make_params, make_step
    from bench.shapes import MODELS, param_count
    from bench.timing import environment, median_ms

    if not torch.cuda.is_available():
        ap.error("needs a GPU")
    device = torch.device("cuda")
    result = {"env": environment(device), "rows": []}
    for model in args.models.split(","):
        specs = MODELS[model]
        matrices, others = make_params(specs, device, torch.bfloat16)
        start = time.perf_counter()
        for impl in args.impls.split(","):
            row = {"model": model, "params": param_count(specs), "impl": impl}
            if time.perf_counter() - start > args.budget_s:
                row["error"] = f"skipped: the model's {args.budget_s:.0f} s budget is spent"
            else:
                try:
                    step, _ = make_step(impl, matrices, others)
                    t0 = time.perf_counter()
                    step()
                    torch.cuda.synchronize()
                    row["first_step_s"] = time.perf_counter() - t0
                    row["median_ms"] = median_ms(step, device, quick=True)
                except Exception as exc:  # report and go on: one failure must not hide the rest
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            result["rows"].append(row)
            print(f"{model:12s} {impl:18s} "
                  + (f"{row['median_ms']:9.3f} ms" if "median_ms" in row else row.get("error", "")),
                  flush=True)
        del matrices, others
        torch.cuda.empty_cache()
    for row in result["rows"]:
        base = {r["impl"]: r.get("median_ms") for r in result["rows"] if r["model"] == row["model"]}
        if row.get("median_ms"):
            for peer in ("torch-muon", "trasmuon"):
                if base.get(peer):
                    row[f"speedup_vs_{peer}"] = base[peer] / row["median_ms"]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 1 if any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
