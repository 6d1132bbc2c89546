"""The controlled diagnostic of the paper's Appendix G: column bursts on an ill-conditioned
matrix least-squares problem (the shape of the paper's Tables 4 and 5).

    f(W) = 1/2 ||A W B - T||_F^2,   A = U S_A U^T,  B = V S_B V^T,  T = A W* B,

W is 64 x 64 and starts at 0; U, V are random orthogonal; S_A and S_B have log-spaced
eigenvalues from 1 down to 1/sqrt(kappa), so the operator W -> A W B has condition number
kappa (1e2, 1e4, 1e6). Every K_out = 80 steps (800 steps, lr 0.05 cosine-decayed to 0) a
multiplicative burst hits the momentum: M_t -> s * M_t with s = 50 along 4 of the 64 input
directions (``trasmuon.bursts.ColumnBurst``, ``mode="momentum"``; s * 0.95^80 = 0.83 < 1,
so a burst has decayed before the next one). ``fix_V=True``: the burst directions are 4 coordinate columns, drawn
once per seed and hit again at every burst (the basis the column gate measures energy in).
``fix_V=False`` (the "broken basis"): each burst scales 4 random orthonormal directions of
a freshly drawn basis, whose energy spreads over all 64 columns. ``none``: no bursts (the
control). Compared: NorMuon, TrasMuon-noClip (clip=False), Clip-only (schedule_free=False)
and Clip-sf (the defaults), same lr, same problem and bursts per seed.

Reported per (kappa, setting, optimizer), as median and IQR over seeds: the spike count,
the spike height and the final loss (all on the loss relative to f(W_0)):

- a *spike* starts at step t when L_t > 2 * min(L_{t-20}, ..., L_{t-1}) and L_{t-1} did
  not already satisfy that test against its own window: a run of consecutive steps more
  than twice the best loss of the 20 steps before counts as one spike;
- the *spike height* of a burst at step b is max(L_b, ..., L_{b+K_out-1}) / L_{b-1}, and a
  run's height is the median over its bursts;
- the *final loss* is the mean of the last 10 steps' L.

    python bench/experiments/diagnostic.py            # CPU default (a few minutes)
    python bench/experiments/diagnostic.py --quick    # seconds
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from trasmuon.bursts import ColumnBurst

NAME = "diagnostic"
OPTIMIZERS = ("normuon", "noclip", "clip_only", "clip_sf")
SETTINGS = ("fix_V=True", "fix_V=False", "none")


@dataclass(frozen=True)
class Config:
    d_out: int = 64
    d_in: int = 64
    kappas: tuple[float, ...] = (1e2, 1e4, 1e6)
    steps: int = 800
    lr: float = 0.05  # cosine-decayed to 0 over the run
    k_out: int = 80  # burst period K_out
    burst_scale: float = 50.0  # s (s * b1**K_out = 0.83 < 1: bursts do not pile up)
    burst_cols: int = 4
    spike_factor: float = 2.0
    spike_window: int = 20
    final_window: int = 10
    control_optimizers: tuple[str, ...] = ("normuon", "clip_sf")  # run without bursts


CONFIGS = {
    "quick": Config(kappas=(1e2, 1e6), steps=48, k_out=12, d_out=16, d_in=16, burst_cols=2,
                    spike_window=6, final_window=4),
    "cpu": Config(),
    "cuda": Config(d_out=256, d_in=256, steps=2000, burst_cols=16),
}


class Quadratic(nn.Module):
    """The single weight matrix W (a hidden matrix for ``split_params``)."""

    def __init__(self, d_out: int, d_in: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_out, d_in))


def make_problem(kappa: float, d_out: int, d_in: int, seed: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64))[0]
    half = math.log10(kappa) / 2  # cond(A) = cond(B) = sqrt(kappa)
    a = u @ torch.diag(torch.logspace(0, -half, d_out, dtype=torch.float64)) @ u.T
    b = v @ torch.diag(torch.logspace(0, -half, d_in, dtype=torch.float64)) @ v.T
    w_star = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
    t = a @ w_star @ b
    return tuple(x.to(device=device, dtype=torch.float32) for x in (a, b, t))


def count_spikes(losses: list[float], factor: float, window: int) -> int:
    count, prev = 0, False
    for t in range(window, len(losses)):
        above = losses[t] > factor * min(losses[t - window:t])
        if above and not prev:
            count += 1
        prev = above
    return count


def spike_heights(losses: list[float], burst_steps: list[int], k_out: int) -> list[float]:
    """max(L_b..L_{b+K_out-1}) / L_{b-1} per burst step b (1-based steps)."""
    out = []
    for b in burst_steps:
        if b >= 2 and b - 1 + k_out <= len(losses):
            out.append(max(losses[b - 1:b - 1 + k_out]) / losses[b - 2])
    return out


def run_one(opt_name: str, setting: str, kappa: float, seed: int, cfg: Config,
            device: torch.device, record_diag: bool) -> dict[str, Any]:
    a, b, target = make_problem(kappa, cfg.d_out, cfg.d_in, seed, device)
    model = Quadratic(cfg.d_out, cfg.d_in).to(device)
    diag_on = record_diag and opt_name in ("clip_only", "clip_sf")
    opt = C.make_optimizer(opt_name, model, cfg.lr, diagnostics=diag_on)
    bursts = None
    if setting != "none":
        fixed = setting == "fix_V=True"
        bursts = ColumnBurst(opt, every=cfg.k_out, scale=cfg.burst_scale, n_cols=cfg.burst_cols,
                             mode="momentum", basis="columns" if fixed else "random",
                             redraw=not fixed, seed=seed)
    w = model.weight
    f0 = 0.5 * float((target**2).sum())
    losses, diag = [], []
    for step in range(1, cfg.steps + 1):
        loss = 0.5 * ((a @ w @ b - target) ** 2).sum()
        loss.backward()
        opt.param_groups[0]["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / cfg.steps))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()) / f0)
        if diag_on:
            d = opt.diagnostics()["weight"]
            diag.append({k: d[k] for k in ("c_min", "c_mean", "r_max", "triggered_frac")})
    burst_steps = bursts.burst_steps if bursts is not None else []
    heights = spike_heights(losses, burst_steps, cfg.k_out)
    record = {
        "optimizer": opt_name, "setting": setting, "kappa": kappa, "seed": seed,
        "spikes": count_spikes(losses, cfg.spike_factor, cfg.spike_window),
        "spike_height": C.quantiles(heights)["median"] if heights else None,
        "final_loss": sum(losses[-cfg.final_window:]) / cfg.final_window,
        "burst_steps": burst_steps,
        "burst_columns": [list(e.columns) for e in bursts.events] if bursts is not None and
        setting == "fix_V=True" else None,
        "loss": losses,
    }
    if diag:
        record["diagnostics"] = {k: [d[k] for d in diag] for k in diag[0]}
    return record


def summarize(runs: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    rows = []
    for kappa in cfg.kappas:
        for setting in SETTINGS:
            for name in OPTIMIZERS:
                sel = [r for r in runs if r["kappa"] == kappa and r["setting"] == setting
                       and r["optimizer"] == name]
                if not sel:
                    continue
                heights = [r["spike_height"] for r in sel if r["spike_height"] is not None]
                rows.append({
                    "kappa": kappa, "setting": setting, "optimizer": name, "n_seeds": len(sel),
                    "spikes": C.quantiles([r["spikes"] for r in sel]),
                    "spike_height": C.quantiles(heights) if heights else None,
                    "final_loss": C.quantiles([r["final_loss"] for r in sel]),
                })
    return rows


def normuon_equals_noclip(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The rule says clip=False is NorMuon. Largest loss difference between the two, same inputs."""
    by_key = {(r["kappa"], r["setting"], r["seed"], r["optimizer"]): r for r in runs}
    worst = 0.0
    pairs = 0
    for (kappa, setting, seed, name), r in by_key.items():
        other = by_key.get((kappa, setting, seed, "noclip"))
        if name == "normuon" and other is not None:
            pairs += 1
            worst = max(worst, max(abs(x - y) for x, y in zip(r["loss"], other["loss"],
                                                                 strict=True)))
    return {"pairs": pairs, "max_abs_loss_difference": worst, "identical": worst == 0.0}


def fmt_q(q: dict[str, float] | None, fmt: str) -> str:
    if q is None:
        return "-"
    return f"{q['median']:{fmt}} [{q['q25']:{fmt}}, {q['q75']:{fmt}}]"


def table(rows: list[dict[str, Any]]) -> str:
    body = [[f"{r['kappa']:.0e}", r["setting"], C.LABELS[r["optimizer"]],
             fmt_q(r["spikes"], ".1f"), fmt_q(r["spike_height"], ".2f"),
             fmt_q(r["final_loss"], ".2e")] for r in rows]
    return C.fmt_table(["kappa", "bursts", "optimizer", "spikes: median [q25, q75]",
                        "spike height", "final loss (rel.)"], body)


def plot(result: dict[str, Any], path: Path) -> Path:
    plt = C.pyplot()
    cfg = result["config"]
    kappas = cfg["kappas"]
    seed = result["seeds"][0]
    fig, axes = plt.subplots(2, len(kappas), figsize=(5.5 * len(kappas), 7.5), squeeze=False,
                             sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    for j, kappa in enumerate(kappas):
        ax, gate_ax = axes[0][j], axes[1][j]
        for r in result["runs"]:
            if r["kappa"] != kappa or r["seed"] != seed or r["optimizer"] == "noclip":
                continue
            style = {"fix_V=True": "-", "fix_V=False": ":", "none": "--"}[r["setting"]]
            ax.semilogy(range(1, len(r["loss"]) + 1), r["loss"], style, lw=0.9,
                        color=C.COLORS[r["optimizer"]],
                        alpha=0.45 if r["setting"] == "none" else 0.9,
                        label=f"{C.LABELS[r['optimizer']]}, {r['setting']}")
            if r["setting"] == "fix_V=True" and "diagnostics" in r:
                gate_ax.plot(range(1, len(r["loss"]) + 1), r["diagnostics"]["c_min"],
                             color=C.COLORS[r["optimizer"]], lw=0.9,
                             label=f"{C.LABELS[r['optimizer']]}: min_j c_j")
        bursts = next((r["burst_steps"] for r in result["runs"] if r["burst_steps"]), [])
        for b in bursts:
            ax.axvline(b, color="k", lw=0.4, alpha=0.3)
            gate_ax.axvline(b, color="k", lw=0.4, alpha=0.3)
        ax.set_title(f"kappa = {kappa:.0e} (seed {seed}); grey lines: bursts")
        ax.grid(alpha=0.3)
        gate_ax.set_xlabel("step")
        gate_ax.set_ylim(0.65, 1.02)
        gate_ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("f(W_t) / f(W_0)")
    axes[1][0].set_ylabel("applied gate, fix_V=True")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    return C.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = C.base_parser(__doc__.split("\n\n")[0], default_seeds=range(8), name=NAME)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--burst-scale", type=float, default=None)
    parser.add_argument("--k-out", type=int, default=None)
    args = C.finish_args(parser.parse_args(argv))
    key = "quick" if args.quick else ("cuda" if args.device.type == "cuda" else "cpu")
    cfg = CONFIGS[key]
    overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr),
                                   ("burst_scale", args.burst_scale), ("k_out", args.k_out))
                 if v is not None}
    cfg = replace(cfg, **overrides)
    seeds = args.seeds[:1] if args.quick and len(args.seeds) > 1 and args.seeds == list(range(8)) \
        else args.seeds
    clock = C.Stopwatch()
    jobs = [(kappa, setting, name, seed)
            for kappa in cfg.kappas for setting in SETTINGS for name in OPTIMIZERS
            for seed in seeds if setting != "none" or name in cfg.control_optimizers]
    print(f"{len(jobs)} runs of {cfg.steps} steps: {asdict(cfg)}")
    runs = []
    for kappa, setting, name, seed in C.progress(jobs, total=len(jobs), desc="runs",
                                                 enabled=not args.no_progress):
        runs.append(run_one(name, setting, kappa, seed, cfg, args.device,
                            record_diag=seed == seeds[0]))
    rows = summarize(runs, cfg)
    result = {
        "experiment": NAME, "config_name": key, "config": asdict(cfg), "seeds": seeds,
        "definitions": {
            "relative_loss": "L_t = f(W_t) / f(W_0), W_0 = 0, f evaluated before step t",
            "spike": f"onset of L_t > {cfg.spike_factor} * min(L_(t-{cfg.spike_window}..t-1)); "
                     "consecutive steps count once",
            "spike_height": "median over bursts b of max(L_b..L_(b+K_out-1)) / L_(b-1)",
            "final_loss": f"mean of the last {cfg.final_window} L_t",
            "fix_V=True": "basis='columns', redraw=False (same coordinate columns every burst)",
            "fix_V=False": "basis='random', redraw=True (fresh random orthonormal directions)",
            "kappa": "cond(A) = cond(B) = sqrt(kappa), eigenvalues log-spaced",
            "lr": "one lr for all, cosine-decayed to 0",
        },
        "normuon_vs_noclip": normuon_equals_noclip(runs),
        "summary": rows, "versions": C.versions(args.device), "runs": runs,
        "wall_seconds": clock(),
    }
    out = C.save_json(args.out / f"{C.result_name(NAME, args.quick)}.json", result)
    print()
    print(table(rows))
    eq = result["normuon_vs_noclip"]
    print(f"NorMuon vs TrasMuon-noClip: max |loss difference| {eq['max_abs_loss_difference']:.3g}"
          f" over {eq['pairs']} paired runs")
    if not args.no_plot:
        print(f"plot: {plot(result, args.plot_dir / f'{C.result_name(NAME, args.quick)}.png')}")
    print(f"results: {out}  (total {clock():.0f}s)")
    return result


if __name__ == "__main__":
    main()
