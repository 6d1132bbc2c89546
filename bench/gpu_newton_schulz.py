"""Newton–Schulz on the GPU: our Triton kernels vs torch.optim.Muon's orthogonalization,
torch.compile of the eager reference, and (optionally) the authors' Triton NS.

One call on a GPU does everything and writes one JSON file:

    python bench/gpu_newton_schulz.py                       # -> bench/results/gpu_newton_schulz_<gpu>.json
    python bench/gpu_newton_schulz.py --authors-venv /work/authors-venv   # + the authors' NS
    python bench/gpu_newton_schulz.py --autotune            # + our opt-in autotuned configs
    python bench/gpu_newton_schulz.py --interpret-smoke     # CPU: correctness part, tiny shapes

For each shape (5 NS steps; 1024^2, 4096^2, 4096x11008 and the stacks 12x768x3072,
28x1024x3072) it records:

* the median time (``triton.testing.do_bench`` after warm-up, via bench/timing.py) of
  - ``ours-fp32-in``: ``trasmuon_kernels.newton_schulz`` from the fp32 momentum, computing
    ||X||_F itself (preallocated ``out`` and workspace);
  - ``ours-bf16-in``: from bf16 X with ``fro_sumsq`` given, as in the fused optimizer step
    (docs/backends.md: the momentum pass writes X and the norm);
  - ``ours-gram`` (rectangular shapes): ``trasmuon_kernels.gram_newton_schulz`` from the same
    bf16 X, one restart after step 2 (``ns_method="gram"``; its fraction of the floor is
    against the standard iteration's FLOPs);
  - ``torch-muon``: ``torch.optim._muon._zeropower_via_newtonschulz`` (2D only: a Python
    loop over a stack, as torch.optim.Muon does per parameter; it takes one triple, so it
    runs Muon's coefficients: same FLOPs);
  - ``compiled-reference``: ``torch.compile(trasmuon.reference.newton_schulz)`` in bf16;
  - ``authors-triton`` (with ``--authors-venv``): ``trasmuon.newton_schulz_triton`` of PyPI
    ``trasmuon-pytorch``, timed in a subprocess of that venv (its module is also named
    ``trasmuon``);
* the FLOPs of 5 steps with and without symmetric products, the measured bf16 matmul rate
  (torch.mm, 8192^3; ``ns_flops`` and ``matmul_tflops`` of bench/timing.py) and the resulting floor (symmetric FLOPs / rate), and each timing's
  fraction of that floor;
* correctness: relative Frobenius error of every implementation against the float64
  iteration on the same bf16 input, and ours / torch's bf16 chain (the ratio the tests
  bound by 1.5; not for ``ours-gram``, whose bf16 iteration on R is about twice as far from
  float64: docs/rule.md).

The JSON is written after every row. ``--budget-s``: before every shape and every
implementation the seconds since the script started are checked; once they pass the budget,
what is left gets rows with ``"error": "skipped: ..."`` (exit status 1), so that a run under a
time limit ends with its JSON complete instead of being cut off.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_STARTED = time.perf_counter()  # --budget-s counts from here (imports included)
ROOT = Path(__file__).resolve().parents[1]
SHAPES: list[tuple[int, ...]] = [
    (1024, 1024),
    (4096, 4096),
    (4096, 11008),
    (12, 768, 3072),
    (28, 1024, 3072),
]
SMOKE_SHAPES: list[tuple[int, ...]] = [(9, 17), (17, 9), (2, 12, 20), (3, 20, 12)]
EPS = 1e-7  # the authors' default; ours takes it as an argument


def _load_reference_by_path():
    """Our reference module without importing the ``trasmuon`` package (the authors' venv
    has its own ``trasmuon``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_our_reference", ROOT / "trasmuon" / "reference.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _timing():
    sys.path.insert(0, str(ROOT / "bench"))
    import timing  # bench/timing.py, by path (only torch and triton)

    return timing


def _errors(out, x, schedule, ref):
    """(error vs float64, error of torch's bf16 chain vs float64) on the same input."""
    import torch

    truth = ref.newton_schulz(x.double(), schedule, EPS, torch.float64)
    chain = ref.newton_schulz(x, schedule, EPS, torch.bfloat16)

    def rel(a):
        return ((a.double() - truth).norm() / truth.norm()).item()

    return rel(out), rel(chain)


# --------------------------------------------------------------------------------------
# The authors' NS, inside their venv
# --------------------------------------------------------------------------------------
def authors_worker(job_path: str, out_path: str) -> None:
    import torch

    job = json.loads(Path(job_path).read_text())
    device = torch.device(job["device"])
    timing = _timing()
    ref = _load_reference_by_path()
    rows = []
    try:
        from trasmuon import newton_schulz_triton as mod  # the authors' package

        fn = mod.newton_schulz_triton if device.type == "cuda" else mod.zeropower_via_newtonschulz5
        name = fn.__name__ if hasattr(fn, "__name__") else str(fn)
    except Exception as exc:
        Path(out_path).write_text(json.dumps({"error": repr(exc)}))
        return
    schedule = ref.ns_schedule(ref.TRASMUON_NS_COEFFICIENTS, 5)
    for shape in job["shapes"]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=gen).to(torch.bfloat16).to(device)
        row = {"shape": shape, "impl": "authors-triton", "function": name}
        try:
            out = fn(x, epsilon=EPS)
            row["median_ms"] = timing.median_ms(
                lambda x=x: fn(x, epsilon=EPS), device, quick=job["quick"]
            )
            row["err_vs_fp64"], row["torch_bf16_err"] = _errors(out, x, schedule, ref)
            row["err_ratio"] = row["err_vs_fp64"] / row["torch_bf16_err"]
        except Exception as exc:  # e.g. a shape their kernels do not take
            row["error"] = repr(exc)
        rows.append(row)
    Path(out_path).write_text(json.dumps({"rows": rows, "env": timing.environment(device)}))


def run_authors(venv: Path, shapes, device: str, quick: bool) -> dict:
    python = venv / "bin" / "python"
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(
            json.dumps({"shapes": [list(s) for s in shapes], "device": device, "quick": quick})
        )
        # Their package imports triton at import time: never hand it our interpreter flag.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
        proc = subprocess.run(
            [str(python), str(Path(__file__).resolve()), "--authors-worker", str(job), str(out)],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp,
            check=False,
        )
        if not out.exists():
            return {"error": f"authors worker failed (rc {proc.returncode}): {proc.stderr[-2000:]}"}
        return json.loads(out.read_text())


# --------------------------------------------------------------------------------------
# Ours, torch's, the compiled reference
# --------------------------------------------------------------------------------------
class _Skipped(Exception):
    """A row left out because the budget is spent."""


def _budget_spent(budget_s: float | None) -> str | None:
    """The skip message once the script has run past ``budget_s`` seconds, else None."""
    if budget_s is not None and time.perf_counter() - _STARTED > budget_s:
        return f"skipped: the {budget_s:.0f} s budget is spent"
    return None


def bench_shape(shape, device, args, ref, rate_tflops, compiled_ref, emit) -> None:
    """Every implementation on one shape, each row handed to ``emit`` as soon as it is done."""
    import torch

    from trasmuon_kernels.fro_sumsq import fro_sumsq
    from trasmuon_kernels.gram_newton_schulz import gram_newton_schulz, gram_newton_schulz_workspace
    from trasmuon_kernels.newton_schulz import newton_schulz, newton_schulz_workspace

    timing = _timing()
    rectangular = shape[-1] != shape[-2]  # (Gram Newton-Schulz saves nothing on a square)
    steps = 5
    schedule = ref.ns_schedule(ref.TRASMUON_NS_COEFFICIENTS, steps)
    if not _budget_spent(args.budget_s):  # (a skipped shape allocates and compiles nothing)
        gen = torch.Generator().manual_seed(0)
        m32 = torch.randn(*shape, generator=gen).to(device)
        x16 = m32.to(torch.bfloat16)
        sumsq = fro_sumsq(x16.reshape(-1, *shape[-2:]))
        out = torch.empty(shape, device=device, dtype=torch.bfloat16)
        ws = newton_schulz_workspace(shape, device, steps=steps)
        if rectangular:
            gram_ws = gram_newton_schulz_workspace(shape, device, steps=steps)
    flops_sym = timing.ns_flops(shape, steps, True)
    floor_ms = flops_sym / (rate_tflops * 1e12) * 1e3
    base = {
        "shape": list(shape),
        "steps": steps,
        "flops_symmetric": flops_sym,
        "flops_full": timing.ns_flops(shape, steps, False),
        "floor_ms_symmetric": floor_ms,
    }

    def record(impl, fn, result=None, schedule_used=schedule, **extra):
        row = {**base, "impl": impl, **extra}
        skipped = _budget_spent(args.budget_s)
        try:
            if skipped:
                raise _Skipped(skipped)
            result = fn() if result is None else result
            if args.interpret_smoke and impl.startswith("ours"):
                row["median_ms"] = None  # interpreter timings mean nothing
            else:
                row["median_ms"] = timing.median_ms(fn, device, quick=args.quick)
                row["fraction_of_floor"] = floor_ms / row["median_ms"]
            row["err_vs_fp64"], row["torch_bf16_err"] = _errors(result, x16, schedule_used, ref)
            row["err_ratio"] = row["err_vs_fp64"] / row["torch_bf16_err"]
        except _Skipped as exc:
            row["error"] = str(exc)
        except Exception as exc:
            row["error"] = repr(exc)
        emit(row)
        print(
            f"{'x'.join(map(str, shape)):>14} {impl:>20}: "
            + (f"{row['median_ms']:.4f} ms" if row.get("median_ms") else "   -     ")
            + (
                f"  err {row['err_vs_fp64']:.3e} ratio {row['err_ratio']:.3f}"
                if "err_ratio" in row
                else ""
            )
            + (f"  {row['error']}" if "error" in row else ""),
            flush=True,
        )

    record("ours-fp32-in", lambda: newton_schulz(m32, schedule, EPS, out=out, workspace=ws))
    record(
        "ours-bf16-in",
        lambda: newton_schulz(x16, schedule, EPS, fro_sumsq=sumsq, out=out, workspace=ws),
    )
    if rectangular:  # the default restart after step 2; its FLOPs differ from the floor's
        record("ours-gram", lambda: gram_newton_schulz(x16, schedule, EPS, fro_sumsq=sumsq, out=out,
                                                       workspace=gram_ws))
    if args.autotune:
        record(
            "ours-autotuned",
            lambda: newton_schulz(
                x16, schedule, EPS, fro_sumsq=sumsq, out=out, workspace=ws, autotune=True
            ),
        )

    muon_schedule = ref.ns_schedule(ref.MUON_NS_COEFFICIENTS, steps)
    torch_ns = torch.optim._muon._zeropower_via_newtonschulz

    def torch_muon():
        mats = list(m32.reshape(-1, *shape[-2:]).unbind(0))
        res = [torch_ns(g, ref.MUON_NS_COEFFICIENTS, steps, EPS) for g in mats]
        return torch.stack(res).reshape(shape)

    record("torch-muon", torch_muon, schedule_used=muon_schedule)
    if compiled_ref is not None:
        record("compiled-reference", lambda: compiled_ref(m32, schedule, EPS))



def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--interpret-smoke",
        action="store_true",
        help="CPU + TRITON_INTERPRET=1: the correctness part on tiny shapes",
    )
    ap.add_argument(
        "--authors-venv",
        type=Path,
        default=None,
        help="a venv with PyPI trasmuon-pytorch: also time the authors' Triton NS",
    )
    ap.add_argument("--autotune", action="store_true", help="also time our autotuned configs")
    ap.add_argument("--quick", action="store_true", help="shorter timing loops")
    ap.add_argument("--no-compiled-reference", action="store_true",
                    help="skip torch.compile of the eager reference (minutes of compiling)")
    ap.add_argument("--shapes", default=None, help="e.g. '1024x1024,12x768x3072'")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip the shapes and implementations left once the script has run this "
                         "many seconds")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--authors-worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.authors_worker:
        authors_worker(*args.authors_worker)
        return
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton or the kernels are imported
    sys.path.insert(0, str(ROOT))
    import torch

    from trasmuon import reference as ref

    timing = _timing()
    device = torch.device("cpu" if args.interpret_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no GPU here: run with --interpret-smoke for the CPU correctness check")
    shapes = SMOKE_SHAPES if args.interpret_smoke else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    quick = args.quick or args.interpret_smoke
    args.quick = quick

    rate = timing.matmul_tflops(device, quick)
    print(f"bf16 matmul rate: {rate:.4g} TFLOP/s on {timing.device_name(device)}")
    # torch.compile of the reference needs a C++ toolchain on the CPU and minutes of compile
    # for nothing useful in the smoke run: there it is checked eagerly.
    compiled_ref = None
    if device.type == "cuda" and not args.no_compiled_reference:
        compiled_ref = torch.compile(ref.newton_schulz, dynamic=False)
    out = args.out
    if out is None and not args.interpret_smoke:
        slug = "".join(c if c.isalnum() else "_" for c in timing.device_name(device)).strip("_")
        out = ROOT / "bench" / "results" / f"gpu_newton_schulz_{slug}.json"
    rows: list = []
    result = {
        "env": timing.environment(device),
        "interpret_smoke": bool(args.interpret_smoke),
        "bf16_matmul_tflops": rate,
        "eps": EPS,
        "rows": rows,
    }
    def emit(row: dict) -> None:
        rows.append(row)
        timing.write_json(out, result)  # after every row: a run that is cut off keeps what it measured

    for shape in shapes:
        bench_shape(shape, device, args, ref, rate, compiled_ref, emit)
    if args.authors_venv is not None and _budget_spent(args.budget_s):
        result["authors"] = {"error": _budget_spent(args.budget_s)}
    elif args.authors_venv is not None:
        authors = run_authors(args.authors_venv, shapes, device.type, quick)
        result["authors"] = authors
        for row in authors.get("rows", []):
            flops = timing.ns_flops(tuple(row["shape"]), 5, True)
            if row.get("median_ms"):
                row["fraction_of_floor"] = flops / (rate * 1e12) * 1e3 / row["median_ms"]
            print(
                f"{'x'.join(map(str, row['shape'])):>14} {'authors-triton':>20}: "
                + (
                    f"{row['median_ms']:.4f} ms  err {row['err_vs_fp64']:.3e} ratio {row['err_ratio']:.3f}"
                    if "median_ms" in row
                    else row.get("error", "")
                ),
                flush=True,
            )
        if "error" in authors:
            print("authors:", authors["error"])
    timing.write_json(out, result)
    if out is not None:
        print(f"wrote {out}")
    bad = [
        r
        for r in rows
        if "error" in r or (r["impl"].startswith("ours") and r["impl"] != "ours-gram"
                            and r.get("err_ratio", 0) > 1.5)
    ]
    if bad:
        skipped = sum(r.get("error", "").startswith("skipped") for r in bad)
        print(f"{len(bad) - skipped} rows failed or exceeded the 1.5 error ratio, "
              f"{skipped} skipped (budget)")
        sys.exit(1)


if __name__ == "__main__":
    main()
