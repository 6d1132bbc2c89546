"""One whole optimizer step on a GPU: ours on the Triton backend, plain and replayed from a
CUDA graph, against torch.optim.Muon (+ fused AdamW for the non-matrix params), against our
eager backend, and against the step's floor.

    python bench/gpu_step.py --out step.json                       # GPT-2 small, Qwen3-0.6B
    python bench/gpu_step.py --models gpt2-small --impls trasmuon-triton,torch-muon

The parameter sets are bench/shapes.py's (bf16 params and grads, random values), the steps
bench/common.py's ``make_step``. Each implementation takes one step untimed first (Triton
compiles its kernels there; the time is recorded as ``first_step_s``), then the median of
``triton.testing.do_bench`` (bench/timing.py). An implementation that fails, or runs past
``--budget-s`` for its model, is reported with its error and the others still run.

``<rule>-triton-cudagraph``: ``cuda_graph=True``, the optimizer capturing its own step (a
float lr, staged before every replay); timed as ``opt.step()`` after its warm-up and capture,
host checks and replay included.

Peers from other packages (bench/common.py's ``PEERS``, optional): ``pto-muon`` and
``pto-normuon`` (pytorch_optimizer's Muon and NorMuon) and ``heavyball-muon`` (heavyball's
Muon, which torch.compiles its fused functions: its first step includes the compile), each
on the matrices with its defaults at lr 1e-3 (heavyball's with ``consume_grad=False``: it
would free the gradients the next steps need), the other params on fused torch.optim.AdamW. A
peer whose package is missing gets a row with ``"error": "not installed: ..."``, which does
not fail the run (bench/fetch_peers.sh brings them to a machine without network).

``<rule>-triton-graph``: the Triton step with a tensor lr, captured in a CUDA graph after two
warm-up steps (docs/architecture.md, "Capturing the step"), timed as ``graph.replay()``. Before
timing, one replay is checked against one eager step from the same weights, state and gradients
(``graph_check``: the largest weight difference relative to the distance moved).

The floor (``floor_ms``, per model): the symmetric Newton-Schulz FLOPs of all its matrices (5
steps, bench/timing.py's ``ns_flops(..., symmetric=True)``: about 3 s^2 l + s^3 per step for an
s x l matrix, the Gram and the polynomial products on one triangle) at the bf16 matmul rate
measured here (``matmul_tflops``), plus the bytes the step must move (per matrix
element: G 2, M 8, X 2, O 2 and 2, W 4; per AdamW element 22) at the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("gpt2-small", "qwen3-0.6b")
DEFAULT_IMPLS = ("trasmuon-triton", "trasmuon-triton-cudagraph", "trasmuon-triton-graph", "trasmuon",
                 "torch-muon", "normuon-triton", "muon-triton", "namo_d-triton",
                 "pto-muon", "pto-normuon", "heavyball-muon")


def floor_ms(specs, matmul_tflops: float, copy_gbs: float) -> float:
    """The step's floor on this GPU (see the module docstring)."""
    from bench.timing import ns_flops

    flops = bytes_ = 0.0
    for shape, count, kind in specs:
        n = 1
        for d in shape:
            n *= d
        if kind == "matrix":
            flops += count * ns_flops(shape, 5, symmetric=True)
            bytes_ += count * n * 20
        else:
            bytes_ += count * n * 22
    return flops / (matmul_tflops * 1e12) * 1e3 + bytes_ / (copy_gbs * 1e9) * 1e3


def measured_rates(device) -> dict[str, float]:
    """The bf16 matmul rate (an 8192^3 product) and the device copy bandwidth, measured."""
    from bench.timing import copy_bandwidth_gbs, matmul_tflops

    return {"matmul_tflops": matmul_tflops(device), "copy_gbs": copy_bandwidth_gbs(device)}


def graph_step(impl: str, matrices, others):
    """A captured step of ``impl`` (``<rule>-triton``) and the largest weight difference of
    one replay against one eager step from the same starting point."""
    import copy

    import torch

    from bench.common import make_step

    step, opts = make_step(impl, matrices, others, tensor_lr=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = matrices + others
    for _ in range(2):  # warm up: builds the plan, compiles every kernel
        step()
    start = [p.detach().clone() for p in params]
    eager = copy.deepcopy(opts[0])
    eager.backend = "eager"
    eager_params = [p for g in eager.param_groups for p in g["params"]]
    for p, q in zip(eager_params, params, strict=True):
        q.grad.copy_(torch.randn(q.shape, device="cuda", generator=gen).to(q.dtype) * 1e-3)
        p.grad = q.grad.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for p, p0 in zip(params, start, strict=True):  # the capture ran nothing: start from p0
        p.data.copy_(p0)
    graph.replay()
    eager.step()
    torch.cuda.synchronize()
    worst = 0.0
    for p, q, p0 in zip(params, eager_params, start, strict=True):
        moved = (q.detach().float() - p0.float()).norm()
        if moved > 0:
            worst = max(worst, float((p.detach().float() - q.detach().float()).norm() / moved))
    return graph.replay, worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--impls", default=",".join(DEFAULT_IMPLS))
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="skip the remaining implementations of a model after this many seconds")
    ap.add_argument("--compile-only", action="store_true",
                    help="take each implementation's first step only (Triton compiles its kernels "
                         "into its disk cache), no timing: run_gpu.sh runs it beside the parity parts")
    ap.add_argument("--interpret-smoke", action="store_true",
                    help="CPU + TRITON_INTERPRET=1, GPT-2's structure at 1 x 32: the same rows "
                         "and JSON, to check the script without a GPU (its times mean nothing)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.interpret_smoke:
        import os

        os.environ["TRITON_INTERPRET"] = "1"  # before triton or the kernels are imported
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.common import SMOKE_MODEL, SMOKE_SPECS, PeerNotInstalled, make_params, make_step
    from bench.shapes import MODELS, param_count
    from bench.timing import environment, median_ms, write_json

    if args.interpret_smoke:
        device = torch.device("cpu")
        MODELS = {**MODELS, SMOKE_MODEL: SMOKE_SPECS}
        if args.models == ",".join(DEFAULT_MODELS):
            args.models = SMOKE_MODEL
        # (a hand-made capture needs CUDA; cuda_graph=True runs uncaptured, with its warning)
        args.impls = ",".join(i for i in args.impls.split(",") if not i.endswith("-graph"))
    elif not torch.cuda.is_available():
        ap.error("needs a GPU (or --interpret-smoke)")
    else:
        device = torch.device("cuda")
    if device.type == "cuda" and not args.compile_only:
        rates = measured_rates(device)
    else:  # (the CPU dry run's and the compile pass's floors are not reported)
        rates = {"matmul_tflops": 1.0, "copy_gbs": 10.0}
    result = {"env": environment(device), "rates": rates, "rows": []}
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
                    t0 = time.perf_counter()
                    if impl.endswith("-graph"):
                        step, row["graph_check"] = graph_step(impl.removesuffix("-graph"), matrices, others)
                    else:
                        # (the dry run's heavyball without torch.compile: a minute of CPU compile
                        # for times that mean nothing)
                        step, _ = make_step(impl, matrices, others,
                                            compile_peers=not args.interpret_smoke)
                        for _ in range(4 if impl.endswith("-cudagraph") else 1):
                            step()  # (cuda_graph=True: two warm-up steps, the capture, a replay)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    row["first_step_s"] = time.perf_counter() - t0
                    if not args.compile_only:
                        row["median_ms"] = median_ms(step, device, quick=True)
                        row["floor_ms"] = floor_ms(specs, **rates)
                except PeerNotInstalled as exc:
                    row["error"] = str(exc)[:500]
                except Exception as exc:  # report and go on: one failure must not hide the rest
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            result["rows"].append(row)
            write_json(args.out, result)  # as it goes: a slot that runs out keeps what was measured
            print(f"{model:12s} {impl:18s} "
                  + (f"{row['median_ms']:9.3f} ms" if "median_ms" in row else
                     row.get("error", f"first step {row.get('first_step_s', 0):.1f} s")),
                  flush=True)
        del matrices, others
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in result["rows"]:
        base = {r["impl"]: r.get("median_ms") for r in result["rows"] if r["model"] == row["model"]}
        if row.get("median_ms"):
            for peer in ("torch-muon", "trasmuon"):
                if base.get(peer):
                    row[f"speedup_vs_{peer}"] = base[peer] / row["median_ms"]
    write_json(args.out, result)
    if args.out:
        print(f"wrote {args.out}")
    # (a peer that is not installed is a fact about the machine, not a failure of the run)
    return 1 if any("error" in r and not r["error"].startswith("not installed")
                    for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
