"""Byte-level language model: TrasMuon vs NorMuon, Muon and AdamW (the paper's Figure 1).

A small decoder-only transformer is trained from scratch on bytes of a corpus that needs no
download: by default the Python standard library's own ``.py`` sources (found through
``sysconfig.get_paths()["stdlib"]``, test directories and build-specific files left out,
concatenated in sorted path order, a fixed-size slice; ``--corpus PATH`` takes any file).
Each optimizer trains the same model (same init) on the same batches in the same order with
the same learning rate under a warmup-stable-decay (WSD) schedule, with and without warmup.
Reported: steps for the smoothed training loss to reach a threshold and each baseline's
steps divided by TrasMuon's (the paper: 2.35x vs AdamW and 1.75x vs Muon with warmup; 6.21x
and 1.73x without), final training and validation loss, and a PNG of the curves.

    python bench/experiments/lm.py              # the CPU default (under 10 minutes on 2 cores)
    python bench/experiments/lm.py --quick      # seconds: a smoke test
    python bench/experiments/lm.py --device cuda          # a larger model, more steps
    python bench/experiments/lm.py --full       # + a per-optimizer lr sweep first
    python bench/experiments/lm.py --state-dtype bfloat16   # matrix momentum in bf16 (SR)
    python bench/experiments/lm.py --ns-method gram          # Gram Newton-Schulz
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import sysconfig
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

NAME = "lm"
OPTIMIZERS = C.MAIN_SIX
# What --optimizers accepts: the six, and the NAMO weight-decay ablation.
CHOICES = (*C.MAIN_SIX, "namo_lr", "namo_d_lr")
SCHEDULES = ("warmup", "no_warmup")
# Directories and files of the stdlib left out of the default corpus: tests, installed
# packages, and files generated for one build (their bytes differ between machines).
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Config:
    d_model: int
    n_layers: int
    n_heads: int
    ctx: int
    batch: int
    steps: int
    lr: float
    corpus_bytes: int
    eval_every: int
    eval_batches: int
    final_eval_batches: int
    warmup_frac: float = 0.1  # of the steps, in the "warmup" schedule
    decay_frac: float = 0.2  # the last part of the steps, linear to 0
    weight_decay: float = 0.0
    val_frac: float = 0.1  # every (1/val_frac)-th block of the slice: never trained on
    block_bytes: int = 1 << 16  # the train/validation split unit
    smooth_beta: float = 0.95  # EMA of the training loss for the threshold metric


CONFIGS = {
    "quick": Config(d_model=32, n_layers=1, n_heads=2, ctx=32, batch=8, steps=24, lr=3e-3,
                    corpus_bytes=1 << 18, eval_every=12, eval_batches=2, final_eval_batches=2),
    "cpu": Config(d_model=128, n_layers=2, n_heads=4, ctx=64, batch=16, steps=400, lr=3e-3,
                  corpus_bytes=4 << 20, eval_every=50, eval_batches=8, final_eval_batches=32),
    "cuda": Config(d_model=384, n_layers=6, n_heads=6, ctx=256, batch=64, steps=3000, lr=3e-3,
                   corpus_bytes=11 << 20, eval_every=100, eval_batches=16, final_eval_batches=64),
}


# ----------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------
def stdlib_files(root: Path) -> list[str]:
    """The stdlib's .py files as sorted relative posix paths (tests and build files out)."""
    paths = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not x.startswith("config-")]
        rel = Path(d).relative_to(root).parts
        paths.extend("/".join((*rel, f)) for f in files
                     if f.endswith(".py") and not f.startswith("_sysconfigdata"))
    return sorted(paths)


def load_corpus(path: Path | None, n_bytes: int) -> tuple[bytes, dict[str, Any]]:
    """The first ``n_bytes`` of the corpus, and where they came from (with a sha256)."""
    if path is not None:
        with open(path, "rb") as f:
            data = f.read(n_bytes)
        info: dict[str, Any] = {"source": str(path)}
    else:
        root = Path(sysconfig.get_paths()["stdlib"])
        chunks, size, used = [], 0, 0
        for rel in stdlib_files(root):
            if size >= n_bytes:
                break
            chunk = (root / rel).read_bytes()
            chunks.append(chunk)
            size += len(chunk)
            used += 1
        data = b"".join(chunks)[:n_bytes]
        info = {"source": f"python stdlib ({root})", "files_used": used,
                "first_file": stdlib_files(root)[0]}
    if len(data) < 1 << 12:
        raise SystemExit(f"corpus too small: {len(data)} bytes")
    info.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    return data, info


def split_blocks(tokens: torch.Tensor, val_frac: float, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation bytes: the slice is cut into blocks of ``block`` bytes and every
    ``round(1 / val_frac)``-th block (the last of each group) is validation. Interleaving
    keeps both sets on the same mix of modules (the stdlib's sorted order puts, e.g., the
    highly regular ``encodings`` tables together; a held-out tail would be one kind of code)."""
    period = max(2, round(1 / val_frac))
    block = min(block, max(1, len(tokens) // (2 * period)))
    n_blocks = -(-len(tokens) // block)
    is_val = torch.tensor([(i % period) == period - 1 for i in range(n_blocks)])
    mask = is_val.repeat_interleave(block)[: len(tokens)]
    return tokens[~mask], tokens[mask]


class Batches:
    """Deterministic random windows of a byte tensor: batch i is the same for everyone."""

    def __init__(self, data: torch.Tensor, ctx: int, batch: int, seed: int, device: torch.device):
        self.data, self.ctx, self.batch, self.device = data, ctx, batch, device
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.data) - self.ctx - 1, (self.batch,), generator=self.gen)
        idx = starts[:, None] + torch.arange(self.ctx + 1)
        chunk = self.data[idx].long().to(self.device)
        return chunk[:, :-1], chunk[:, 1:]


# ----------------------------------------------------------------------------------------
# Model: a pre-norm GPT with learned positions, no biases in the hidden matrices
# ----------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_out = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_out(F.gelu(self.fc(self.ln2(x))))


class ByteLM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.tok_emb = nn.Embedding(256, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.ctx, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, 256, bias=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith("_out.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb.weight[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------
def wsd_factor(step: int, total: int, warmup_frac: float, decay_frac: float) -> float:
    """Warmup-stable-decay multiplier of the lr at 1-based step ``step``: linear warmup over
    the first ``warmup_frac`` of the steps, constant, then linear to 0 over the last
    ``decay_frac`` (reaching 0 after the last step)."""
    warmup = round(warmup_frac * total)
    decay = max(1, round(decay_frac * total))
    if step <= warmup:
        return step / warmup
    if step > total - decay:
        return (total - step + 1) / (decay + 1)
    return 1.0


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    loss = sum(float(model(x, y)) for x, y in batches) / len(batches)
    model.train()
    return loss


def train_one(
    opt_name: str, schedule: str, cfg: Config, seed: int, lr: float, train_data: torch.Tensor,
    val_batches: list, final_batches: list, device: torch.device, show_progress: bool,
    state_dtype: torch.dtype | None = None, ns_method: str | None = None,
) -> dict[str, Any]:
    C.seed_everything(seed)
    model = ByteLM(cfg).to(device)
    opt = C.make_optimizer(opt_name, model, lr, weight_decay=cfg.weight_decay,
                           diagnostics=opt_name == "trasmuon", state_dtype=state_dtype,
                           ns_method=ns_method)
    base_lrs = [g["lr"] for g in opt.param_groups]
    warmup_frac = cfg.warmup_frac if schedule == "warmup" else 0.0
    data = Batches(train_data, cfg.ctx, cfg.batch, seed, device)
    losses, lrs, evals, gate = [], [], [], []
    clock = C.Stopwatch()
    bar = C.progress(range(1, cfg.steps + 1), total=cfg.steps, enabled=show_progress,
                     desc=f"{C.LABELS[opt_name]:>8} {schedule}")
    for step in bar:
        factor = wsd_factor(step, cfg.steps, warmup_frac, cfg.decay_frac)
        for group, base in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = base * factor
        x, y = data.next()
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            losses.append(value)
            break
        losses.append(value)
        lrs.append(lr * factor)
        if opt_name == "trasmuon":
            diag = [d for d in opt.diagnostics().values() if "c_min" in d]
            gate.append({
                "c_min": min(d["c_min"] for d in diag),
                "triggered_frac": sum(d["triggered_frac"] for d in diag) / len(diag),
                "r_max": max(d["r_max"] for d in diag),
            })
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evals.append({"step": step, "val_loss": evaluate(model, val_batches)})
    C.sync(device)
    seconds = clock()
    finite = all(math.isfinite(v) for v in losses)
    smooth = C.ema(losses, cfg.smooth_beta) if finite else []
    record = {
        "optimizer": opt_name, "schedule": schedule, "seed": seed, "lr": lr,
        "steps_done": len(losses), "diverged": not finite, "seconds": seconds,
        "train_loss": losses, "train_loss_ema": smooth, "lr_curve": lrs, "val_curve": evals,
        "final_train_loss_ema": smooth[-1] if smooth else math.nan,
        "final_val_loss": evaluate(model, final_batches) if finite else math.nan,
    }
    if gate:
        record["gate"] = {k: [g[k] for g in gate] for k in gate[0]}
        record["gate_summary"] = {
            "min_c_min": min(record["gate"]["c_min"]),
            "mean_triggered_frac": sum(record["gate"]["triggered_frac"]) / len(gate),
            "steps_with_trigger": sum(1 for g in gate if g["triggered_frac"] > 0),
        }
    return record


def steps_to_threshold(runs: list[dict[str, Any]], thr: float, rule: str) -> dict[str, Any]:
    """Steps for each run's smoothed training loss to reach ``thr``, and each baseline's
    steps divided by TrasMuon's. A run that never reaches it counts as all its steps, and
    its ratio is marked a lower bound."""
    steps = {}
    for r in runs:
        curve = r["train_loss_ema"]
        steps[r["optimizer"]] = (
            C.first_step_at_or_below(curve, thr, range(1, len(curve) + 1)) if curve else None
        )
    base = steps.get("trasmuon")
    n_steps = max(len(r["train_loss"]) for r in runs)
    ratios = {}
    for name, s in steps.items():
        if name != "trasmuon" and base is not None:
            ratios[name] = {"ratio": (s if s is not None else n_steps) / base,
                            "lower_bound": s is None}
    return {"threshold": thr, "rule": rule, "steps": steps, "ratios_vs_trasmuon": ratios}


def threshold_metrics(runs: list[dict[str, Any]], threshold: float | None) -> dict[str, Any]:
    """The threshold metrics of one schedule's runs.

    ``"all"``: the threshold is the highest final smoothed loss among all the runs, the
    best loss every optimizer reaches (the slowest one reaches it at about its last step).
    ``"matrix"``: the highest final smoothed loss among the orthogonalized optimizers
    (TrasMuon, NorMuon, Muon): a tighter level that compares them at the end of training,
    where AdamW usually never gets (its ratio is then a lower bound). ``--threshold``
    replaces both by one given value (``"given"``).
    """
    ok = [r for r in runs if not r["diverged"]]
    if threshold is not None:
        return {"given": steps_to_threshold(runs, threshold, "given")}
    out = {"all": steps_to_threshold(
        runs, max(r["final_train_loss_ema"] for r in ok), "max final EMA train loss, all")}
    matrix = [r for r in ok if r["optimizer"] != "adamw"]
    if matrix and len(matrix) < len(ok):
        out["matrix"] = steps_to_threshold(
            runs, max(r["final_train_loss_ema"] for r in matrix),
            "max final EMA train loss, orthogonalized optimizers")
    return out


PAPER_RATIOS = {"warmup": {"adamw": 2.35, "muon": 1.75}, "no_warmup": {"adamw": 6.21, "muon": 1.73}}


def lr_sweep(cfg: Config, seed: int, train_data, val_batches, final_batches, device, show) -> dict:
    """--full: each optimizer at lr/3, lr and 3*lr (warmup schedule); best by final val loss."""
    grid = [cfg.lr / 3, cfg.lr, cfg.lr * 3]
    table: dict[str, dict[str, float]] = {}
    for name in OPTIMIZERS:
        table[name] = {}
        for lr in grid:
            r = train_one(name, "warmup", cfg, seed, lr, train_data, val_batches,
                          final_batches, device, show)
            table[name][repr(lr)] = r["final_val_loss"]
            print(f"  sweep {C.LABELS[name]:>8} lr={lr:.4g}: val {r['final_val_loss']:.4f}")
    best = {n: float(min(v, key=lambda k: (math.isnan(v[k]), v[k]))) for n, v in table.items()}
    return {"grid": grid, "final_val_loss": table, "best_lr": best}


def plot(result: dict[str, Any], path: Path) -> Path:
    """The first seed's curves."""
    plt = C.pyplot()
    seed = result["seeds"][0]
    schedules = result.get("schedules", SCHEDULES)
    fig, axes = plt.subplots(1, len(schedules), figsize=(6 * len(schedules), 4.2), sharey=True,
                             squeeze=False)
    for ax, schedule in zip(axes[0], schedules, strict=True):
        metrics = result["metrics"][str(seed)][schedule]
        for r in result["runs"]:
            if r["schedule"] != schedule or r["seed"] != seed or not r["train_loss_ema"]:
                continue
            name = r["optimizer"]
            ax.plot(range(1, len(r["train_loss_ema"]) + 1), r["train_loss_ema"],
                    color=C.COLORS[name], label=f"{C.LABELS[name]} (train, EMA)")
            ax.plot([e["step"] for e in r["val_curve"]], [e["val_loss"] for e in r["val_curve"]],
                    "o", ms=3, color=C.COLORS[name], alpha=0.7)
        for (key, m), ls in zip(metrics.items(), ("--", ":"), strict=False):
            ax.axhline(m["threshold"], color="k", lw=0.8, ls=ls, label=f"threshold ({key})")
        ax.set_title(f"WSD {'with' if schedule == 'warmup' else 'without'} warmup")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    first = axes[0][0]
    first.set_ylabel("loss (nats/byte); dots: validation")
    lo = min(min(r["train_loss_ema"]) for r in result["runs"] if r["train_loss_ema"])
    first.set_ylim(lo - 0.1, min(5.6, lo + 3.0))
    first.legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(f"byte-level LM, d={cfg['d_model']} L={cfg['n_layers']} ctx={cfg['ctx']}, "
                 f"lr={cfg['lr']:g}, seed {seed}", fontsize=10)
    return C.save_figure(fig, path)


def summary_table(result: dict[str, Any], seed: int) -> str:
    by_schedule = result["metrics"][str(seed)]
    schedules = result.get("schedules", SCHEDULES)
    keys = list(by_schedule[schedules[0]])
    rows = []
    for schedule in schedules:
        metrics = by_schedule[schedule]
        for r in result["runs"]:
            if r["schedule"] != schedule or r["seed"] != seed:
                continue
            name = r["optimizer"]
            row = [schedule, C.LABELS[name]]
            for key in keys:
                m = metrics[key]
                s, ratio = m["steps"].get(name), m["ratios_vs_trasmuon"].get(name)
                row.append("never" if s is None else s)
                row.append("-" if ratio is None else
                           f"{'>' if ratio['lower_bound'] else ''}{ratio['ratio']:.2f}x")
            paper = PAPER_RATIOS[schedule].get(name)
            row += ["-" if paper is None else f"{paper:.2f}x",
                    f"{r['final_train_loss_ema']:.4f}", f"{r['final_val_loss']:.4f}",
                    f"{r['seconds']:.0f}s"]
            rows.append(row)
    header = ["schedule", "optimizer"]
    for key in keys:
        header += [f"steps to thr[{key}]", f"ratio[{key}]"]
    header += ["paper ratio", "final train (EMA)", "val loss", "time"]
    lines = [C.fmt_table(header, rows),
             "ratio = the optimizer's steps to the threshold / TrasMuon's (> 1: TrasMuon is faster)"]
    for key in keys:
        thr = ", ".join(f"{s} {by_schedule[s][key]['threshold']:.4f}" for s in schedules)
        lines.append(f"thr[{key}] ({by_schedule[schedules[0]][key]['rule']}): {thr}")
    return f"seed {seed}:\n" + "\n".join(lines)


def ratio_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Mean, min and max over seeds of each ratio (lower bounds count at their bound)."""
    out: dict[str, Any] = {}
    for schedule in result.get("schedules", SCHEDULES):
        for key in result["metrics"][str(result["seeds"][0])][schedule]:
            for name in OPTIMIZERS:
                vals = [result["metrics"][str(s)][schedule][key]["ratios_vs_trasmuon"].get(name)
                        for s in result["seeds"]]
                vals = [v["ratio"] for v in vals if v is not None]
                if vals:
                    out[f"{schedule}/{key}/{name}"] = {
                        "mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals),
                        "n": len(vals)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = C.base_parser(__doc__.split("\n\n")[0], default_seeds=[0], name=NAME)
    parser.add_argument("--corpus", type=Path, default=None,
                        help="a text file to train on instead of the stdlib sources")
    parser.add_argument("--steps", type=int, default=None, help="override the config's steps")
    parser.add_argument("--lr", type=float, default=None, help="override the shared lr")
    parser.add_argument("--threshold", type=float, default=None,
                        help="one loss threshold (default: two, the highest final EMA train "
                             "loss of all optimizers and of the orthogonalized ones)")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=CHOICES)
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="override the config's weight decay (the same for every optimizer); "
                             "results then go to lm_wd<value>.json")
    parser.add_argument("--state-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the matrix rules' momentum: float32 (the default) or bf16 with "
                             "stochastic rounding; results then go to lm_state-bfloat16.json")
    parser.add_argument("--ns-method", choices=("standard", "gram"), default="standard",
                        help="the matrix rules' Newton-Schulz form (docs/rule.md, ns_method)")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES,
                        help="the lr schedules to run (default: both)")
    parser.add_argument("--full", action="store_true",
                        help="first sweep lr in {lr/3, lr, 3lr} per optimizer, then compare "
                             "each at its best lr")
    args = C.finish_args(parser.parse_args(argv))
    key = "quick" if args.quick else ("cuda" if args.device.type == "cuda" else "cpu")
    cfg = CONFIGS[key]
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps, eval_every=max(1, min(cfg.eval_every, args.steps)))
    if args.lr is not None:
        cfg = replace(cfg, lr=args.lr)
    if args.weight_decay is not None:
        cfg = replace(cfg, weight_decay=args.weight_decay)
    seeds = args.seeds
    clock = C.Stopwatch()

    data, corpus = load_corpus(args.corpus, cfg.corpus_bytes)
    print(f"corpus: {corpus['source']}: {corpus['bytes']:,} bytes, sha256 {corpus['sha256'][:16]}...")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    train_data, val_data = split_blocks(tokens, cfg.val_frac, cfg.block_bytes)
    val_gen = Batches(val_data, cfg.ctx, cfg.batch, 10_000, args.device)  # same for all seeds
    val_batches = [val_gen.next() for _ in range(cfg.eval_batches)]
    final_batches = val_batches + [val_gen.next()
                                   for _ in range(cfg.final_eval_batches - cfg.eval_batches)]
    n_params = sum(p.numel() for p in ByteLM(cfg).parameters())
    print(f"model: {n_params / 1e6:.2f}M params, config {key}: {asdict(cfg)}")
    show = not args.no_progress

    sweep = None
    lrs = {name: cfg.lr for name in args.optimizers}
    if args.full:
        sweep = lr_sweep(cfg, seeds[0], train_data, val_batches, final_batches, args.device, show)
        lrs = {name: sweep["best_lr"][name] for name in args.optimizers}

    state_dtype = None if args.state_dtype == "float32" else getattr(torch, args.state_dtype)
    runs = []
    for seed in seeds:
        for schedule in args.schedules:
            for name in args.optimizers:
                r = train_one(name, schedule, cfg, seed, lrs[name], train_data, val_batches,
                              final_batches, args.device, show, state_dtype,
                              None if args.ns_method == "standard" else args.ns_method)
                print(f"seed {seed} {schedule:>9} {C.LABELS[name]:>8}: final train "
                      f"{r['final_train_loss_ema']:.4f}  val {r['final_val_loss']:.4f}  "
                      f"({r['seconds']:.1f}s)")
                runs.append(r)
    metrics = {str(seed): {s: threshold_metrics(
        [r for r in runs if r["schedule"] == s and r["seed"] == seed], args.threshold)
        for s in args.schedules} for seed in seeds}
    result: dict[str, Any] = {
        "experiment": NAME, "config_name": key, "config": asdict(cfg), "seeds": seeds,
        "lr_per_optimizer": lrs, "lr_rule": "one shared lr; Muon with adjust_lr_fn="
        "'match_rms_adamw'" + ("; per-optimizer best of the --full sweep" if args.full else ""),
        "corpus": corpus, "n_params": n_params, "versions": C.versions(args.device),
        "metrics": metrics, "paper_ratios": PAPER_RATIOS, "lr_sweep": sweep, "runs": runs,
        "state_dtype": args.state_dtype, "ns_method": args.ns_method, "schedules": args.schedules,
        "wall_seconds": clock(),
    }
    result["ratio_summary"] = ratio_summary(result) if len(seeds) > 1 else None
    wd_tag = f"_wd{args.weight_decay:g}" if args.weight_decay is not None else ""
    if args.state_dtype != "float32":
        wd_tag += f"_state-{args.state_dtype}"
    if args.ns_method != "standard":
        wd_tag += f"_ns-{args.ns_method}"
    stem = C.result_name(NAME + ("_full" if args.full else "") + wd_tag, args.quick)
    save_json = C.save_json(args.out / f"{stem}.json", result)
    for seed in seeds:
        print()
        print(summary_table(result, seed))
    if len(seeds) > 1:
        print("\nratios over seeds (mean [min, max]):")
        for k, v in result["ratio_summary"].items():
            print(f"  {k}: {v['mean']:.2f}x [{v['min']:.2f}, {v['max']:.2f}]")
    if not args.no_plot:
        png = plot(result, args.plot_dir / f"{stem}.png")
        print(f"plot: {png}")
    print(f"results: {save_json}  (total {clock():.0f}s)")
    return result


if __name__ == "__main__":
    main()
