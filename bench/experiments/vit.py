"""A small ViT on Fashion-MNIST with and without column-burst stress (the paper's
Appendix E.4 analogue).

The data come from the Debian package ``dataset-fashion-mnist`` (gzipped idx files under
/usr/share/datasets/fashion-mnist; when they are missing the script prints the command that
installs them and exits, it installs nothing itself; ``--data DIR`` points at any directory
holding the four idx files).

Model: 7 x 7 patches (16 tokens) and a class token, width 64, 3 pre-norm blocks with 4
heads and MLP width 128, learned positions, a linear head. Each optimizer trains the same
initialization on the same batches with the same lr (warmup then cosine to 0; Muon with
``adjust_lr_fn="match_rms_adamw"``); hidden matrices (attention, MLP and the patch
embedding) on the compared rule, the rest on AdamW.

Bursts (``--bursts``, both settings by default): ``trasmuon.bursts.ColumnBurst`` with
``mode="grad"`` on the hidden matrices, for every optimizer alike: every 10 steps the
gradient of 25% of each matrix's input columns (drawn once per seed and matrix, then hit
at every burst) is multiplied by 500. (Milder settings, 5% of the columns every 20 steps
times 50 or 500, changed no optimizer's accuracy by more than 0.3 points here.) Reported: test accuracy (10,000 images), mean and std
over seeds, per optimizer and setting.

    python bench/experiments/vit.py           # CPU default (a few minutes)
    python bench/experiments/vit.py --quick   # seconds
"""

from __future__ import annotations

import gzip
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from trasmuon.bursts import ColumnBurst

NAME = "vit"
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DEB_PACKAGE = "dataset-fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz",
}


@dataclass(frozen=True)
class Config:
    dim: int = 64
    depth: int = 3
    heads: int = 4
    mlp: int = 128
    patch: int = 7
    batch: int = 128
    steps: int = 400
    lr: float = 3e-3
    warmup: int = 20
    burst_every: int = 10
    burst_scale: float = 500.0
    burst_frac: float = 0.25
    train_subset: int | None = None  # None: all 60,000
    test_subset: int | None = None  # None: all 10,000
    optimizers: tuple[str, ...] = C.MAIN_SIX


CONFIGS = {
    "quick": Config(dim=32, depth=1, heads=2, mlp=64, batch=32, steps=20, warmup=2,
                    burst_every=5, train_subset=2048, test_subset=512),
    "cpu": Config(),
    "cuda": Config(dim=192, depth=6, heads=6, mlp=384, steps=4000, lr=2e-3, warmup=200),
}


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------
def ensure_data(data_dir: Path) -> Path:
    """The directory with the four idx files, or an exit that says how to get them (the
    script never installs anything itself)."""
    if all((data_dir / f).exists() for f in FILES.values()):
        return data_dir
    raise SystemExit(
        f"Fashion-MNIST is not available in {data_dir}. Install it with\n"
        f"    sudo apt-get update && sudo apt-get install -y {DEB_PACKAGE}\n"
        "(`dpkg -L dataset-fashion-mnist` lists the files), or pass --data DIR with the four "
        f"gzipped idx files: {', '.join(FILES.values())}"
    )


def read_idx(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)


def load_data(data_dir: Path) -> dict[str, torch.Tensor]:
    data = {k: read_idx(data_dir / f) for k, f in FILES.items()}
    for split in ("train", "test"):
        x = data[f"{split}_images"].float() / 255.0
        data[f"{split}_images"] = (x - 0.2860) / 0.3530  # Fashion-MNIST train mean / std
        data[f"{split}_labels"] = data[f"{split}_labels"].long()
    return data


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, mlp, bias=False)
        self.mlp_out = nn.Linear(mlp, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_out(F.gelu(self.fc(self.ln2(x))))


class ViT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.patch = cfg.patch
        n_tokens = (28 // cfg.patch) ** 2
        self.patch_embed = nn.Linear(cfg.patch * cfg.patch, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n_tokens + 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp) for _ in range(cfg.depth))
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.patch
        b = images.shape[0]
        x = images.unfold(1, p, p).unfold(2, p, p).reshape(b, -1, p * p)
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(x)], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x[:, 0]))


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), 1000):
        logits = model(images[i:i + 1000].to(device))
        correct += int((logits.argmax(-1).cpu() == labels[i:i + 1000]).sum())
    model.train()
    return correct / len(images)


def lr_factor(step: int, cfg: Config) -> float:
    if step <= cfg.warmup:
        return step / cfg.warmup
    return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / (cfg.steps - cfg.warmup + 1)))


def run_one(name: str, bursts_on: bool, seed: int, cfg: Config, data, device, show) -> dict[str, Any]:
    C.seed_everything(seed)
    model = ViT(cfg).to(device)
    opt = C.make_optimizer(name, model, cfg.lr)
    base = [g["lr"] for g in opt.param_groups]
    injector = None
    if bursts_on:
        injector = ColumnBurst(opt, C.matrix_params(model), every=cfg.burst_every,
                               scale=cfg.burst_scale, frac=cfg.burst_frac, mode="grad",
                               basis="columns", redraw=False, seed=seed)
    x_train, y_train = data["train_images"], data["train_labels"]
    if cfg.train_subset is not None:
        x_train, y_train = x_train[:cfg.train_subset], y_train[:cfg.train_subset]
    x_test, y_test = data["test_images"], data["test_labels"]
    if cfg.test_subset is not None:
        x_test, y_test = x_test[:cfg.test_subset], y_test[:cfg.test_subset]
    gen = torch.Generator().manual_seed(seed + 5_000)
    losses = []
    clock = C.Stopwatch()
    for step in C.progress(range(1, cfg.steps + 1), total=cfg.steps, enabled=show,
                           desc=f"{C.LABELS[name]:>8} {'bursts' if bursts_on else 'clean'} s{seed}"):
        for g, b in zip(opt.param_groups, base, strict=True):
            g["lr"] = b * lr_factor(step, cfg)
        idx = torch.randint(0, len(x_train), (cfg.batch,), generator=gen)
        loss = F.cross_entropy(model(x_train[idx].to(device)), y_train[idx].to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    finite = all(math.isfinite(v) for v in losses)
    return {
        "optimizer": name, "bursts": bursts_on, "seed": seed, "train_loss": losses,
        "test_accuracy": accuracy(model, x_test, y_test, device) if finite else 0.0,
        "diverged": not finite, "seconds": clock(),
        "burst_steps": injector.burst_steps if injector is not None else [],
        "n_burst_events": len(injector.events) if injector is not None else 0,
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    plt = C.pyplot()
    names = result["config"]["optimizers"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for k, bursts_on in enumerate((False, True)):
        means = [result["summary"][n]["bursts" if bursts_on else "clean"]["mean"] * 100 for n in names]
        stds = [result["summary"][n]["bursts" if bursts_on else "clean"]["std"] * 100 for n in names]
        ax.bar([i + (k - 0.5) * width for i in range(len(names))], means, width, yerr=stds,
               capsize=3, label="column bursts" if bursts_on else "clean",
               color=[C.COLORS[n] for n in names], alpha=1.0 if not bursts_on else 0.5,
               edgecolor="k")
    ax.set_xticks(range(len(names)), [C.LABELS[n] for n in names])
    lo = min(result["summary"][n][s]["mean"] for n in names for s in ("clean", "bursts")) * 100
    ax.set_ylim(max(0.0, lo - 5), None)
    ax.set_ylabel("test accuracy (%), mean +- std over seeds")
    ax.set_title("ViT on Fashion-MNIST: solid clean, light with bursts")
    ax.grid(axis="y", alpha=0.3)
    return C.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = C.base_parser(__doc__.split("\n\n")[0], default_seeds=[0, 1, 2], name=NAME)
    parser.add_argument("--data", type=Path, default=DATA_DIR,
                        help="directory with the four gzipped Fashion-MNIST idx files")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--bursts", choices=("both", "on", "off"), default="both")
    parser.add_argument("--optimizers", nargs="+", default=None, choices=C.MAIN_SIX)
    args = C.finish_args(parser.parse_args(argv))
    key = "quick" if args.quick else ("cuda" if args.device.type == "cuda" else "cpu")
    cfg = CONFIGS[key]
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps, warmup=min(cfg.warmup, max(1, args.steps // 10)))
    if args.lr is not None:
        cfg = replace(cfg, lr=args.lr)
    if args.optimizers is not None:
        cfg = replace(cfg, optimizers=tuple(args.optimizers))
    seeds = args.seeds[:1] if args.quick and args.seeds == [0, 1, 2] else args.seeds
    settings = {"both": (False, True), "on": (True,), "off": (False,)}[args.bursts]
    data = load_data(ensure_data(args.data))
    clock = C.Stopwatch()
    runs = []
    for name in cfg.optimizers:
        for bursts_on in settings:
            for seed in seeds:
                r = run_one(name, bursts_on, seed, cfg, data, args.device, not args.no_progress)
                print(f"{C.LABELS[name]:>8} {'bursts' if bursts_on else 'clean ':6} seed {seed}: "
                      f"test acc {100 * r['test_accuracy']:.2f}%  ({r['seconds']:.0f}s)")
                runs.append(r)
    summary = {n: {("bursts" if b else "clean"): C.mean_std(
        [r["test_accuracy"] for r in runs if r["optimizer"] == n and r["bursts"] == b])
        for b in settings} for n in cfg.optimizers}
    result = {"experiment": NAME, "config_name": key, "config": asdict(cfg), "seeds": seeds,
              "data": str(args.data), "summary": summary, "versions": C.versions(args.device),
              "runs": runs, "wall_seconds": clock()}
    out = C.save_json(args.out / f"{C.result_name(NAME, args.quick)}.json", result)
    print()
    header = ["optimizer"] + [f"test acc % ({'bursts' if b else 'clean'})" for b in settings]
    rows = [[C.LABELS[n]] + [f"{100 * s[k]['mean']:.2f} +- {100 * s[k]['std']:.2f}"
                             for k in s] for n, s in summary.items()]
    print(C.fmt_table(header, rows))
    if not args.no_plot and len(settings) == 2:
        print(f"plot: {plot(result, args.plot_dir / f'{C.result_name(NAME, args.quick)}.png')}")
    print(f"results: {out}  (total {clock():.0f}s)")
    return result


if __name__ == "__main__":
    main()
