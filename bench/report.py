"""Turn benchmark JSON into Markdown tables and PNG plots under docs/.

Reads pytest-benchmark files (``pytest bench --benchmark-only --benchmark-json FILE``),
whose ``extra_info`` carries ``suite``, ``case``, ``impl`` and the metrics, and optionally
the authors' package results (``bench/authors/bench_authors.py``). Writes
``docs/benchmarks.md`` and ``docs/img/bench_<suite>.png``.

    python bench/report.py bench/results/*.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The metric shown per suite, and whether smaller is better.
METRICS = {"step": ("median_ms", "ms"), "memory": ("state_bytes_per_param", "B/param")}
DEFAULT_METRIC = ("median_ms", "ms")
REFERENCE_IMPL = ("trasmuon-triton", "trasmuon", "triton")


def load(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    rows, envs = [], []
    for path in paths:
        data = json.loads(path.read_text())
        if "benchmarks" in data:  # pytest-benchmark
            for bench in data["benchmarks"]:
                info = dict(bench.get("extra_info", {}))
                if "suite" in info:
                    rows.append(info)
        else:  # our own result files: {"environment": ..., "rows": [...]}
            rows.extend(r for r in data.get("rows", []) if "suite" in r)
        for row in rows:
            env = {k: row[k] for k in ("device", "driver", "torch", "triton", "cuda") if k in row}
            if env and env not in envs:
                envs.append(env)
    return rows, envs


def suites(rows: list[dict]):
    """Per suite, in name order: (suite, unit, impls, cases, {(case, impl): metric value})."""
    by_suite: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_suite[row["suite"]].append(row)
    for suite, items in sorted(by_suite.items()):
        metric, unit = METRICS.get(suite, DEFAULT_METRIC)
        impls = sorted({r["impl"] for r in items})
        cases = list(dict.fromkeys(r["case"] for r in items))
        yield suite, unit, impls, cases, {(r["case"], r["impl"]): r.get(metric) for r in items}


def tables(rows: list[dict]) -> str:
    out = []
    for suite, unit, impls, cases, cell in suites(rows):
        ref = next((i for i in REFERENCE_IMPL if i in impls), None)
        out.append(f"### {suite} ({unit})\n")
        head = ["case", *impls] + ([f"{i} / {ref}" for i in impls if i != ref] if ref else [])
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for case in cases:
            vals = [cell.get((case, i)) for i in impls]
            line = [case] + [f"{v:.4g}" if v is not None else "" for v in vals]
            if ref:
                base = cell.get((case, ref))
                for i in impls:
                    if i != ref:
                        v = cell.get((case, i))
                        line.append(f"{v / base:.2f}x" if v and base else "")
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out)


def plots(rows: list[dict], img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suite, unit, impls, cases, values in suites(rows):
        cell = {key: value or 0.0 for key, value in values.items()}
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases) * len(impls) / 3), 4))
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            xs = [i + k * width for i in range(len(cases))]
            ax.bar(xs, [cell.get((c, impl), 0.0) for c in cases], width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, rotation=20)
        ax.set_ylabel(unit)
        ax.set_title(suite)
        if suite != "memory":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = img_dir / f"bench_{suite.replace(':', '_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--title", default="Benchmarks")
    args = ap.parse_args(argv)
    rows, envs = load(args.inputs)
    if not rows:
        raise SystemExit("no benchmark rows with a 'suite' in the inputs")
    images = plots(rows, args.out.parent / "img")
    lines = [f"# {args.title}\n", "Environment(s):\n"]
    lines += [f"- {', '.join(f'{k} {v}' for k, v in env.items())}" for env in envs]
    lines += ["", f"Sources: {', '.join(str(p) for p in args.inputs)}\n", tables(rows)]
    lines += [f"![{p.stem}](img/{p.name})" for p in images]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {len(images)} plot(s)")


if __name__ == "__main__":
    main()
