"""Shared plumbing of the experiment scripts: arguments, seeding, the optimizer factory,
statistics, JSON results, plots and progress bars.

No optimizer math lives here: every optimizer is built from ``trasmuon`` (and every burst
from ``trasmuon.bursts``) with the settings below, the same for every script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import trasmuon

REPO = Path(__file__).resolve().parents[2]
# Where a run writes by default: out/ is ignored by git, so running an experiment never
# rewrites the committed results. The published results and plots (docs/experiments.md)
# live in bench/results/experiments and docs/img and are updated only on purpose, with
# ``--out bench/results/experiments --plot-dir docs/img``.
DEFAULT_OUT = REPO / "out" / "experiments"

# The compared optimizers and the paper's ablations (docs/rule.md, "Ablations": NOCLIP =
# clip=False; Clip-only = schedule_free=False; Clip-sf = the defaults).
LABELS = {
    "trasmuon": "TrasMuon",
    "normuon": "NorMuon",
    "muon": "Muon",
    "namo": "NAMO",
    "namo_d": "NAMO-D",
    "adamw": "AdamW",
    "namo_lr": "NAMO (lr decay)",
    "namo_d_lr": "NAMO-D (lr decay)",
    "noclip": "TrasMuon-noClip",
    "clip_only": "Clip-only",
    "clip_sf": "Clip-sf",
}
COLORS = {
    "trasmuon": "tab:red", "normuon": "tab:blue", "muon": "tab:green", "adamw": "tab:gray",
    "namo": "tab:purple", "namo_d": "tab:brown", "namo_lr": "tab:pink", "namo_d_lr": "tab:olive",
    "noclip": "tab:blue", "clip_only": "tab:orange", "clip_sf": "tab:red",
}
# The six compared rules.
MAIN_SIX = ("trasmuon", "normuon", "muon", "namo", "namo_d", "adamw")
# Betas and eps of every AdamW-updated parameter (embeddings, heads, 1-D params, and all
# params of the AdamW baseline): identical under every compared optimizer.
ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8


# ----------------------------------------------------------------------------------------
# Arguments, devices, seeds
# ----------------------------------------------------------------------------------------
def base_parser(description: str, default_seeds: Sequence[int], name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", default="cpu",
                        help="torch device: cpu, cuda, cuda:1, or auto (cuda when available)")
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=list(default_seeds),
                        dest="seeds", help="seed(s): model init, data order and bursts")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny configuration that runs in seconds (a smoke test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"directory of the JSON results ({name}.json, {name}_quick.json); "
                             "the published ones are in bench/results/experiments")
    parser.add_argument("--plot-dir", type=Path, default=None,
                        help="directory of the PNG plots (default: --out; the published ones "
                             "are in docs/img)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads. 1 by default: these models are small, and on a "
                             "busy 2-core machine several threads per process are many times "
                             "slower (measured); --threads 2 helps on an idle machine")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    return parser


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Resolve the device, thread count and output directories after parsing."""
    args.device = resolve_device(args.device)
    if args.threads is not None and args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.plot_dir is None:
        args.plot_dir = args.out
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------
def make_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.0,
    diagnostics: bool = False,
    head: Any = "auto",
    state_dtype: torch.dtype | None = None,
    ns_method: str | None = None,
) -> trasmuon.MatrixOptimizer:
    """One compared optimizer for ``model``, built the same way for every name.

    Hidden matrices (``split_params``) take the named rule; embeddings, heads and non-2D
    params take AdamW with ``ADAMW_BETAS``, ``ADAMW_EPS``, ``lr`` and ``weight_decay`` under
    every optimizer. All rules share the one ``lr`` and the one ``weight_decay``. Each matrix
    rule keeps its own defaults except: Muon uses ``adjust_lr_fn="match_rms_adamw"`` (update
    RMS 0.2*lr, the same calibration as NorMuon's and TrasMuon's ``scale=0.2`` and NAMO's
    ``scale=0.2`` shape factor, whose update RMS is 0.2 times its adaptive step, about lr),
    so one lr means the same nominal update size for all five orthogonalized rules. NAMO and
    NAMO-D decay their weights by their adaptive step (the authors' form); ``namo_lr`` and
    ``namo_d_lr`` decay by lr (the ablation). The AdamW baseline puts every param on AdamW
    with the same betas. ``state_dtype``: the matrix rules' momentum dtype (None: float32;
    torch.bfloat16: bf16 with stochastic rounding, seeded by the run's seed); AdamW's moments
    stay float32. ``ns_method``: the matrix rules' Newton–Schulz form (None: their default,
    "standard"; "gram": the Gram form where it takes fewer FLOPs).
    """
    adamw_options = dict(lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=weight_decay)
    # (1-D params too: the recorded runs decay every AdamW param alike)
    groups = trasmuon.split_params(model, head=head, adamw_options=adamw_options,
                                   no_decay_options={"weight_decay": weight_decay})
    kw = dict(lr=lr, weight_decay=weight_decay, diagnostics=diagnostics)
    if name == "adamw":
        return trasmuon.AdamW(groups, betas=ADAMW_BETAS, eps=ADAMW_EPS, **kw)
    if state_dtype is not None:
        kw["state_dtype"] = state_dtype
    if ns_method is not None:
        kw["ns_method"] = ns_method
    if name == "muon":
        return trasmuon.Muon(groups, adjust_lr_fn="match_rms_adamw", **kw)
    if name == "normuon":
        return trasmuon.NorMuon(groups, **kw)
    if name in ("namo", "namo_lr"):
        return trasmuon.NAMO(groups, weight_decay_mode="lr" if name == "namo_lr" else "adaptive", **kw)
    if name in ("namo_d", "namo_d_lr"):
        return trasmuon.NAMOD(groups, weight_decay_mode="lr" if name == "namo_d_lr" else "adaptive", **kw)
    if name in ("trasmuon", "clip_sf"):
        return trasmuon.TrasMuon(groups, **kw)
    if name == "noclip":
        return trasmuon.TrasMuon(groups, clip=False, **kw)
    if name == "clip_only":
        return trasmuon.TrasMuon(groups, schedule_free=False, **kw)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(LABELS)}")


def matrix_params(model: nn.Module) -> list[torch.Tensor]:
    """The hidden matrices that ``split_params`` puts on the matrix rule."""
    groups = trasmuon.split_params(model)
    return [p for g in groups if g["rule"] != "adamw" for _, p in g["params"]]


# ----------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------
def ema(values: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (as a training-loss display would smooth)."""
    out, acc = [], 0.0
    for i, v in enumerate(values, start=1):
        acc = beta * acc + (1.0 - beta) * v
        out.append(acc / (1.0 - beta**i))
    return out


def first_step_at_or_below(values: Sequence[float], threshold: float, steps: Sequence[int]) -> int | None:
    for s, v in zip(steps, values, strict=True):
        if v <= threshold:
            return s
    return None


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and IQR (linear interpolation, as numpy's default)."""
    xs = sorted(values)

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"median": q(0.5), "q25": q(0.25), "q75": q(0.75), "iqr": q(0.75) - q(0.25)}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "n": n}


# ----------------------------------------------------------------------------------------
# Results, plots, progress
# ----------------------------------------------------------------------------------------
def versions(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "trasmuon": trasmuon.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def result_name(name: str, quick: bool) -> str:
    return f"{name}_quick" if quick else name


def save_json(path: Path, payload: dict[str, Any]) -> Path:
    """Compact JSON (no indentation), floats rounded to 6 significant digits: the per-step
    curves of hundreds of runs stay a few MB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    text = json.dumps(_rounded(payload), separators=(",", ":"), default=_json_default)
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return path


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def progress(iterable: Iterable[Any], *, total: int | None = None, desc: str = "",
             enabled: bool = True, leave: bool = False) -> Iterable[Any]:
    """A tqdm bar on a terminal; silent when disabled, when stderr is not a TTY, or
    without tqdm."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def fmt_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns (what the scripts print at the end)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, sep, *body])
