"""Step-by-step comparison of our TrasMuon with the authors' release on the same gradients.

The authors' package (PyPI ``trasmuon-pytorch`` 0.1.0) installs a module also named
``trasmuon``, so it runs in its own virtual environment, in a subprocess
(``run_authors.py``). Both optimizers get the same initial weights, the same gradient
sequence (Gaussian with multiplicative column bursts, so the gate acts) and the same lr
schedule; the script reports, per step, the relative difference of the weights' displacement
and of E_ref, and the share of columns whose applied gate differs.

``--ns float64`` replaces Newton-Schulz by a float64 evaluation on both sides, isolating the
rest of the rule (then the two should agree to float32 rounding); ``--ns bf16`` compares the
shipped configurations (ours: bf16 products with float32 accumulation; theirs: a compiled
bf16 chain), where rounding differences in NS are expected to grow slowly.

    python bench/authors/compare_authors.py --setup      # once: builds .authors-venv
    python bench/authors/compare_authors.py --ns float64 --steps 60
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import trasmuon

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_VENV = REPO / ".authors-venv"

# Our argument name -> the authors' (docs/rule.md lists both spellings).
ARG_NAMES = {
    "betas": "betas", "eps": "eps", "weight_decay": "weight_decay", "scale": "scale_factor",
    "clip": "col_gate_enabled", "clip_alpha": "col_gate_alpha", "clip_min": "col_gate_cmin",
    "clip_period": "col_gate_every", "clip_min_cols": "col_gate_min_in",
    "clip_beta": "gate_ema", "energy_beta": "E_ref_ema_beta",
    "energy_quantile": "energy_quantile", "energy_eps": "eps_energy",
    "warmup_steps": "warmup_steps", "schedule_free": "sf_enabled", "sf_mix": "sf_mix",
}
ENERGY_SOURCES = {"momentum": "m", "grad": "g", "update": "O_base"}


def authors_kwargs(ours: dict) -> dict:
    out = {ARG_NAMES[k]: v for k, v in ours.items() if k in ARG_NAMES}
    if "clip_trigger" in ours:
        trigger = ours["clip_trigger"]
        out["use_energy_trigger"] = trigger is not None
        if trigger is not None:
            out["energy_k"] = trigger
    if "energy_source" in ours:
        out["col_gate_use"] = ENERGY_SOURCES[ours["energy_source"]]
    return out


def setup_venv(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}", "triton", "numpy"], check=True)
    subprocess.run([*pip, "--no-deps", "trasmuon-pytorch==0.1.0"], check=True)


def make_job(steps: int, seed: int, ns: str, ours_kwargs: dict) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(48, 80), (80, 48), (24, 160)]
    w0 = [torch.randn(s, generator=gen) * 0.05 for s in shapes]
    grads = []
    for t in range(1, steps + 1):
        step = []
        for d_out, d_in in shapes:
            g = torch.randn(d_out, d_in, generator=gen)
            if t % 7 == 0:  # multiplicative bursts on a few columns
                cols = torch.randperm(d_in, generator=gen)[:3]
                g[:, cols] *= 25.0
            step.append(g)
        grads.append(step)
    lrs = [0.02 * min(1.0, t / 10) * (0.5 if t > steps // 2 else 1.0) for t in range(1, steps + 1)]
    return {"w0": w0, "grads": grads, "lrs": lrs, "ns": ns, "kwargs": authors_kwargs(ours_kwargs)}


def run_ours(job: dict, ns: str, ours_kwargs: dict) -> dict:
    params = [torch.nn.Parameter(w.clone()) for w in job["w0"]]
    ns_dtype = torch.float64 if ns == "float64" else torch.bfloat16
    opt = trasmuon.TrasMuon(params, lr=job["lrs"][0], ns_dtype=ns_dtype, backend="eager", **ours_kwargs)
    trace = {"w": [], "c": [], "e_ref": []}
    for lr, grads in zip(job["lrs"], job["grads"], strict=True):
        opt.param_groups[0]["lr"] = lr
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        trace["w"].append([p.detach().clone() for p in params])
        trace["c"].append([opt.state[p]["c_last"].clone() for p in params])
        trace["e_ref"].append([opt.state[p]["energy_ref"].clone() for p in params])
    return trace


def compare(job: dict, ours: dict, theirs: dict) -> list[dict]:
    rows = []
    for t in range(len(job["lrs"])):
        row = {"step": t + 1, "w_rel_diff": [], "gate_mismatch_frac": [], "e_ref_rel_diff": [],
               "damped_frac": []}
        for i, w0 in enumerate(job["w0"]):
            a, b = ours["w"][t][i], theirs["w"][t][i]
            moved = (b - w0).norm().item()
            row["w_rel_diff"].append((a - b).norm().item() / max(moved, 1e-30))
            row["gate_mismatch_frac"].append(
                ((ours["c"][t][i] - theirs["c"][t][i]).abs() > 1e-4).float().mean().item())
            row["damped_frac"].append((theirs["c"][t][i] < 1).float().mean().item())
            e_a, e_b = float(ours["e_ref"][t][i]), float(theirs["e_ref"][t][i])
            row["e_ref_rel_diff"].append(abs(e_a - e_b) / max(abs(e_b), 1e-30))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--authors-venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--setup", action="store_true", help="create the authors' venv and exit")
    ap.add_argument("--ns", choices=("float64", "bf16"), default="float64")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    if args.setup:
        setup_venv(args.authors_venv)
        return {}
    python = args.authors_venv / "bin" / "python"
    if not python.exists():
        sys.exit(f"no authors' venv at {args.authors_venv}; run with --setup first")
    ours_kwargs = dict(clip_period=2, warmup_steps=3, weight_decay=0.05)
    job = make_job(args.steps, args.seed, args.ns, ours_kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "job.pt", Path(tmp) / "trace.pt"
        torch.save(job, inp)
        subprocess.run([str(python), str(HERE / "run_authors.py"), str(inp), str(out)],
                       check=True, cwd=tmp)
        theirs = torch.load(out, weights_only=True)
    ours = run_ours(job, args.ns, ours_kwargs)
    rows = compare(job, ours, theirs)
    version = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                              "print(m.version('trasmuon-pytorch'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    result = {
        "what": "our TrasMuon vs the authors' trasmuon-pytorch on identical gradients",
        "ns": args.ns, "steps": args.steps, "seed": args.seed, "kwargs": ours_kwargs,
        "shapes": [list(w.shape) for w in job["w0"]],
        "torch": torch.__version__, "authors_package": version,
        "machine": platform.processor() or platform.machine(), "device": "cpu",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"authors_parity_cpu_ns-{args.ns}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"{'step':>5} {'max w rel diff':>15} {'gate mismatch':>14} {'E_ref rel diff':>15} "
          f"{'damped cols':>12}")
    for row in rows:
        if row["step"] in (1, 2, 5, 10, 20, 40) or row["step"] == args.steps:
            print(f"{row['step']:>5} {max(row['w_rel_diff']):>15.3e} "
                  f"{max(row['gate_mismatch_frac']):>14.3f} {max(row['e_ref_rel_diff']):>15.3e} "
                  f"{max(row['damped_frac']):>12.3f}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
