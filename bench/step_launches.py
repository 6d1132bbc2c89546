"""Device launches and host time of one optimizer step on the Triton backend, counted on the
CPU, for a model's parameter structure.

    python bench/step_launches.py --model gpt2-small --json bench/results/step_launches_cpu.json
    python bench/step_launches.py --dispatch triton --shrink 1 --model gpt2-small \
        --json bench/results/step_host_dispatch_gpt2-small.json

Two modes. ``--dispatch stub`` (default) runs the warm-up under Triton's interpreter with
dimensions divided by ``--shrink`` and times steps with every launch stubbed before Triton
(``stub_launches``): the optimizer's own Python, without Triton's. ``--dispatch triton`` runs
every launch through Triton's real dispatch (a stand-in driver, ``bench/standin_driver.py``,
compiles every kernel for sm_90 and replaces the final C launcher by one that does nothing;
``simulate_device(H200)`` gives the CPU tensors an H200's launch configs): host time with the
bound launchers (the default) and with Triton's dispatch on every launch
(``triton_dispatch``), and a check that both hand the launcher the same calls.

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
import contextlib
import gc
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

# Before any kernel module is imported: interpreted kernels for the stub mode, real
# JITFunctions for Triton's dispatch.
_TRITON_DISPATCH = "--dispatch=triton" in sys.argv or any(
    a == "--dispatch" and b == "triton" for a, b in zip(sys.argv, sys.argv[1:], strict=False))
if _TRITON_DISPATCH:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import OURS, make_params  # noqa: E402
from bench.shapes import MODELS, MODELS_CI  # noqa: E402
from bench.timing import write_json  # noqa: E402

MODELS = {**MODELS, **MODELS_CI}

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


def dispatch_step(opt, rule: str, host_steps: int) -> dict[str, Any]:
    """Host time of a step with Triton's real dispatch, bound launchers against Triton's own
    path, and whether both give the launcher the same calls (stand-in driver installed)."""
    from bench.standin_driver import LAUNCHER
    from trasmuon_kernels._launch import record_launches, stub_torch_launches, triton_dispatch

    start = time.perf_counter()
    opt.step()  # builds the plan, compiles every kernel for sm_90, binds the launches
    compile_s = time.perf_counter() - start
    opt.step()
    with record_launches() as records:
        opt.step()
    calls = {}
    for name, dispatch in (("bound", contextlib.nullcontext), ("triton", triton_dispatch)):
        LAUNCHER.recording = []
        with dispatch():
            opt.step()
        calls[name], LAUNCHER.recording = LAUNCHER.recording, None
    same = len(calls["bound"]) == len(calls["triton"]) and all(
        same_call(a, b) for a, b in zip(calls["bound"], calls["triton"], strict=True))
    # With a launch hook installed (a profiler's), every launch goes through Triton's
    # dispatch, which passes the hook to the launcher.
    import triton

    def hook(metadata: Any) -> None:
        pass

    hooks = triton.knobs.runtime.launch_enter_hook
    hooked_calls = None
    if hasattr(hooks, "add"):
        LAUNCHER.recording = []
        hooks.add(hook)
        try:
            opt.step()
        finally:
            hooks.remove(hook)
        hooked_calls = sum(1 for call in LAUNCHER.recording if call[7] is hooks)
        LAUNCHER.recording = None
    out = {"compile_and_first_step_s": compile_s,
           "triton_launches": sum(1 for r in records if not r.name.startswith("torch:")),
           "torch_launches": sum(1 for r in records if r.name.startswith("torch:")),
           "launcher_calls": len(calls["bound"]), "bound_calls_equal_triton_calls": same,
           "launcher_calls_with_the_hook_under_a_launch_hook": hooked_calls}
    # The torch launches (a zeroing, a sum over partials, a copy) are skipped while timing:
    # on the CPU they would compute what a GPU queues (about 5 us of host time each there).
    for key, dispatch in (("host_ms_per_step_bound_launchers", contextlib.nullcontext),
                          ("host_ms_per_step_triton_dispatch", triton_dispatch)):
        samples = []
        with dispatch(), stub_torch_launches():
            for _ in range(host_steps):
                t0 = time.perf_counter()
                opt.step()
                samples.append((time.perf_counter() - t0) * 1e3)
        out[key] = statistics.median(samples)
    print(f"{rule:>9}: {out['triton_launches']} Triton launches + {out['torch_launches']} torch (skipped); "
          f"host {out['host_ms_per_step_bound_launchers']:.3f} ms per step with bound launchers, "
          f"{out['host_ms_per_step_triton_dispatch']:.3f} ms through Triton's dispatch; "
          f"same launcher calls: {same}")
    return out


def same_call(bound: tuple, triton_call: tuple) -> bool:
    """Whether a bound launcher's call is Triton's dispatch's: the same grid, stream,
    function, packed metadata and kernel arguments (the same tensor objects); the launch
    metadata and hooks (positions 6-8) are None where Triton passes them with no hook
    installed (empty hook chains: nothing reads them)."""
    if len(bound) != len(triton_call) or bound[6:9] != (None, None, None):
        return False
    if any(getattr(h, "calls", None) for h in triton_call[7:9]):
        return False
    return all(x is y or (not isinstance(x, torch.Tensor) and type(x) is type(y) and x == y)
               for i, (x, y) in enumerate(zip(bound, triton_call, strict=True)) if not 6 <= i <= 8)


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
    parser.add_argument("--dispatch", choices=("stub", "triton"), default="stub",
                        help="stub: launches stubbed before Triton (interpreter warm-up); "
                             "triton: Triton's real dispatch to a launcher that does nothing")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if (args.dispatch == "triton") != _TRITON_DISPATCH:
        parser.error("--dispatch triton must be on the command line (it decides, before the "
                     "kernels are imported, whether they are interpreted)")
    import platform

    import triton

    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "model": args.model, "shrink": args.shrink, "param_dtype": "bfloat16",
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "rules": {},
    }
    from trasmuon_kernels._launch import H200, simulate_device, stub_launches

    if args.dispatch == "triton":
        from bench.standin_driver import install

        install(launcher=True)
        result["dispatch"] = "triton (stand-in sm_90 driver, no-op launcher)"
        for rule in args.rules:
            with simulate_device(H200):
                opt, _ = build(args.model, rule, args.shrink, torch.bfloat16)
                result["rules"][rule] = dispatch_step(opt, rule, args.host_steps)
            del opt
            gc.collect()  # (a 1B model's params, gradients and state before the next rule's)
        write_json(args.json, result)
        return result
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
    write_json(args.json, result)
    return result



if __name__ == "__main__":
    main()
