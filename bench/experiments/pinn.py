"""PINN for the 2-D Helmholtz equation under random region-of-interest sampling shifts
(the paper's Appendix F).

    Delta u + k^2 u = f  on [-1, 1]^2,   u = 0 on the boundary,   k = 2,
    u*(x, y) = sin(pi x) sin(4 pi y),    f = (k^2 - 17 pi^2) u*.

An MLP (2 -> 64 -> 64 -> 64 -> 1, tanh) is trained on the residual at 1024 interior points
plus lambda_b = 100 times the mean squared boundary value at 256 boundary points, all
resampled every step. Until step 1000 interior points are uniform on the square. After
that, every 20 steps an *ROI event* draws one patch from the pool, and for the next 20
steps half of the interior points are uniform in that patch (the other half stay uniform on
the square): a sudden shift of the data distribution, and so of the gradient's energy
across features. The pool: the 16 cells of the 4 x 4 grid that cuts [-1, 1]^2 into squares
of side 0.5 (one drawn uniformly per event, seeded). Boundary points stay uniform on the
boundary. (With all interior points in the patch, every optimizer's error grew from about
0.2 to 2-4 within a few events here: the net forgets the rest of the square, and the
comparison measures nothing else.) The lr follows warmup (50 steps), constant, and a linear
decay to 0 over the last 20% of the steps.

Metric: relative L2 error ||u - u*|| / ||u*|| on a 128 x 128 grid of [-1, 1]^2 (endpoints
included), at the end and along the run. Every optimizer sees the same points, patches and
initialization per seed, and the same lr (Muon with ``adjust_lr_fn="match_rms_adamw"``);
the hidden and input matrices take the compared rule, the output layer and biases AdamW.

    python bench/experiments/pinn.py           # CPU default (a few minutes)
    python bench/experiments/pinn.py --quick   # seconds
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

NAME = "pinn"
K_WAVE = 2.0


@dataclass(frozen=True)
class Config:
    width: int = 64
    depth: int = 3  # hidden layers
    steps: int = 2000
    roi_start: int = 1000  # ROI events at steps roi_start + 1, + 21, ... (every roi_every)
    roi_every: int = 20
    roi_grid: int = 4  # the pool: roi_grid x roi_grid cells of the square
    roi_frac: float = 0.5  # share of the interior points drawn in the patch during an event
    n_interior: int = 1024
    n_boundary: int = 256
    lambda_b: float = 100.0
    lr: float = 1e-2
    warmup: int = 50  # linear lr warmup, constant, then linear to 0 over the last decay_frac
    decay_frac: float = 0.2
    eval_every: int = 100
    eval_grid: int = 128
    optimizers: tuple[str, ...] = ("muon", "trasmuon", "normuon", "namo", "namo_d", "adamw")
    # u*(x, y) = sin(a1 pi x) sin(a2 pi y): (1, 4) is the paper's problem; the quick smoke
    # test solves the smooth (1, 1) one, which a tiny net learns within its few steps.
    modes: tuple[float, float] = (1.0, 4.0)


CONFIGS = {
    "quick": Config(width=16, depth=2, steps=60, roi_start=30, roi_every=10, n_interior=128,
                    n_boundary=64, eval_every=30, eval_grid=32, warmup=5, lr=3e-2,
                    modes=(1.0, 1.0)),
    "cpu": Config(),
    "cuda": Config(width=128, depth=4, steps=6000, roi_start=3000, n_interior=4096,
                   n_boundary=1024),
}


def exact(xy: torch.Tensor, modes: tuple[float, float]) -> torch.Tensor:
    a1, a2 = modes
    return torch.sin(a1 * math.pi * xy[:, 0]) * torch.sin(a2 * math.pi * xy[:, 1])


def forcing(xy: torch.Tensor, modes: tuple[float, float]) -> torch.Tensor:
    a1, a2 = modes
    return (K_WAVE**2 - (a1**2 + a2**2) * math.pi**2) * exact(xy, modes)


class MLP(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        dims = [2] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in itertools.pairwise(dims))
        self.head = nn.Linear(width, 1)  # AdamW under every optimizer (split_params: a head)
        for layer in self.layers:
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        h = xy
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(h).squeeze(-1)


class Sampler:
    """Collocation points: one generator per seed, so every optimizer sees the same ones."""

    def __init__(self, cfg: Config, seed: int, device: torch.device):
        self.cfg, self.device = cfg, device
        self.gen = torch.Generator().manual_seed(seed + 7_000)
        self.patch: tuple[float, float] | None = None
        self.events: list[dict[str, Any]] = []

    def interior(self, step: int) -> torch.Tensor:
        cfg = self.cfg
        if step > cfg.roi_start and (step - cfg.roi_start - 1) % cfg.roi_every == 0:
            cell = int(torch.randint(0, cfg.roi_grid**2, (1,), generator=self.gen))
            side = 2.0 / cfg.roi_grid
            self.patch = (-1.0 + side * (cell % cfg.roi_grid), -1.0 + side * (cell // cfg.roi_grid))
            self.events.append({"step": step, "cell": cell, "x0": self.patch[0],
                                "y0": self.patch[1], "side": side})
        xy = 2.0 * torch.rand(cfg.n_interior, 2, generator=self.gen) - 1.0
        if self.patch is not None:
            n_roi = round(cfg.roi_frac * cfg.n_interior)
            side = 2.0 / cfg.roi_grid
            xy[:n_roi] = torch.tensor(self.patch) + side * (xy[:n_roi] + 1.0) / 2.0
        return xy.to(self.device)

    def boundary(self) -> torch.Tensor:
        n = self.cfg.n_boundary
        t = 2.0 * torch.rand(n, generator=self.gen) - 1.0
        side = torch.randint(0, 4, (n,), generator=self.gen)
        ones = torch.ones(n)
        x = torch.where(side == 0, -ones, torch.where(side == 1, ones, t))
        y = torch.where(side == 2, -ones, torch.where(side == 3, ones, t))
        return torch.stack([x, y], dim=1).to(self.device)


def residual_loss(model: nn.Module, xy: torch.Tensor, modes: tuple[float, float]) -> torch.Tensor:
    xy = xy.requires_grad_(True)
    u = model(xy)
    (grad,) = torch.autograd.grad(u.sum(), xy, create_graph=True)
    u_xx = torch.autograd.grad(grad[:, 0].sum(), xy, create_graph=True)[0][:, 0]
    u_yy = torch.autograd.grad(grad[:, 1].sum(), xy, create_graph=True)[0][:, 1]
    res = u_xx + u_yy + K_WAVE**2 * u - forcing(xy.detach(), modes)
    return (res**2).mean()


@torch.no_grad()
def rel_l2(model: nn.Module, grid: torch.Tensor, truth: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(model(grid) - truth) / torch.linalg.vector_norm(truth))


def lr_factor(step: int, cfg: Config) -> float:
    """Warmup-stable-decay: linear warmup, constant, linear to 0 over the last decay_frac."""
    decay = max(1, round(cfg.decay_frac * cfg.steps))
    if cfg.warmup and step <= cfg.warmup:
        return step / cfg.warmup
    if step > cfg.steps - decay:
        return (cfg.steps - step + 1) / (decay + 1)
    return 1.0


def run_one(name: str, seed: int, cfg: Config, device: torch.device, grid, truth,
            show: bool) -> dict[str, Any]:
    C.seed_everything(seed)
    model = MLP(cfg.width, cfg.depth).to(device)
    opt = C.make_optimizer(name, model, cfg.lr)
    base = [g["lr"] for g in opt.param_groups]
    sampler = Sampler(cfg, seed, device)
    initial = rel_l2(model, grid, truth)
    losses, evals = [], []
    clock = C.Stopwatch()
    for step in C.progress(range(1, cfg.steps + 1), total=cfg.steps, enabled=show,
                           desc=f"{C.LABELS[name]:>8} seed {seed}"):
        factor = lr_factor(step, cfg)
        for g, b in zip(opt.param_groups, base, strict=True):
            g["lr"] = b * factor
        loss = residual_loss(model, sampler.interior(step), cfg.modes) + \
            cfg.lambda_b * (model(sampler.boundary()) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evals.append({"step": step, "rel_l2": rel_l2(model, grid, truth)})
    return {
        "optimizer": name, "seed": seed, "loss": losses, "rel_l2_curve": evals,
        "initial_rel_l2": initial, "final_rel_l2": evals[-1]["rel_l2"],
        "rel_l2_at_roi_start": next((e["rel_l2"] for e in evals if e["step"] >= cfg.roi_start),
                                    None),
        "roi_events": sampler.events, "seconds": clock(),
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in result["runs"]:
        steps = [e["step"] for e in r["rel_l2_curve"]]
        ax.semilogy(steps, [e["rel_l2"] for e in r["rel_l2_curve"]], color=C.COLORS[r["optimizer"]],
                    alpha=0.7, lw=1, label=C.LABELS[r["optimizer"]] if r["seed"] == result["seeds"][0] else None)
    ax.axvline(result["config"]["roi_start"], color="k", ls="--", lw=0.8, label="ROI events begin")
    ax.set_xlabel("step")
    ax.set_ylabel("relative L2 error (128 x 128 grid)")
    ax.set_title(f"Helmholtz PINN, k = {K_WAVE:g}, one line per seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return C.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = C.base_parser(__doc__.split("\n\n")[0], default_seeds=[0, 1, 2], name=NAME)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--optimizers", nargs="+", default=None,
                        choices=C.MAIN_SIX)
    args = C.finish_args(parser.parse_args(argv))
    key = "quick" if args.quick else ("cuda" if args.device.type == "cuda" else "cpu")
    cfg = CONFIGS[key]
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps, roi_start=min(cfg.roi_start, args.steps // 2))
    if args.lr is not None:
        cfg = replace(cfg, lr=args.lr)
    if args.optimizers is not None:
        cfg = replace(cfg, optimizers=tuple(args.optimizers))
    seeds = args.seeds[:1] if args.quick and args.seeds == [0, 1, 2] else args.seeds
    lin = torch.linspace(-1, 1, cfg.eval_grid)
    grid = torch.cartesian_prod(lin, lin).to(args.device)
    truth = exact(grid, cfg.modes)
    clock = C.Stopwatch()
    runs = []
    for name in cfg.optimizers:
        for seed in seeds:
            r = run_one(name, seed, cfg, args.device, grid, truth, not args.no_progress)
            print(f"{C.LABELS[name]:>8} seed {seed}: rel-L2 {r['final_rel_l2']:.4f} "
                  f"(at step {cfg.roi_start}: {r['rel_l2_at_roi_start']:.4f}; {r['seconds']:.0f}s)")
            runs.append(r)
    summary = {}
    for name in cfg.optimizers:
        sel = [r for r in runs if r["optimizer"] == name]
        summary[name] = {"final_rel_l2": C.mean_std([r["final_rel_l2"] for r in sel]),
                         "final_rel_l2_median": C.quantiles([r["final_rel_l2"] for r in sel]),
                         "rel_l2_at_roi_start": C.mean_std([r["rel_l2_at_roi_start"] for r in sel])}
    result = {"experiment": NAME, "config_name": key, "config": asdict(cfg), "seeds": seeds,
              "pde": {"k": K_WAVE, "exact": "sin(pi x) sin(4 pi y)", "domain": "[-1, 1]^2"},
              "roi_pool": f"the {cfg.roi_grid}x{cfg.roi_grid} grid cells of [-1, 1]^2",
              "summary": summary, "versions": C.versions(args.device), "runs": runs,
              "wall_seconds": clock()}
    out = C.save_json(args.out / f"{C.result_name(NAME, args.quick)}.json", result)
    print()
    rows = [[C.LABELS[n], f"{s['final_rel_l2']['mean']:.4f} +- {s['final_rel_l2']['std']:.4f}",
             f"{s['final_rel_l2_median']['median']:.4f}",
             f"{s['rel_l2_at_roi_start']['mean']:.4f}"] for n, s in summary.items()]
    print(C.fmt_table(["optimizer", "final rel-L2 mean +- std", "median",
                       f"rel-L2 at step {cfg.roi_start} (before ROI)"], rows))
    if not args.no_plot:
        print(f"plot: {plot(result, args.plot_dir / f'{C.result_name(NAME, args.quick)}.png')}")
    print(f"results: {out}  (total {clock():.0f}s)")
    return result


if __name__ == "__main__":
    main()
