"""Time the authors' TrasMuon step (PyPI ``trasmuon-pytorch``) on the benchmark models.

Runs inside the authors' own virtual environment (their module is also named ``trasmuon``),
so it imports only the model shapes and the timing helpers of this repository, by path.
Writes ``{"rows": [...]}`` with the same ``suite``/``case``/``impl`` keys as the pytest
suites, for ``bench/report.py``.

    .authors-venv/bin/python bench/authors/bench_authors.py --out bench/results/authors_step.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shapes import MODELS, MODELS_CI  # by path: not our trasmuon package
from timing import environment, median_ms


def main(argv: list[str] | None = None) -> None:
    from trasmuon import TrasMuon  # the authors' package

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("ci", "full"), default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    size = args.size or ("full" if device.type == "cuda" else "ci")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for model, specs in (MODELS if size == "full" else MODELS_CI).items():
        gen = torch.Generator().manual_seed(0)
        params = []
        for shape, count, _kind in specs:
            for _ in range(count):
                p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device, dtype))
                p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device, dtype)
                params.append(p)
        # Their optimizer handles 2D params with its rule and others with AdamW itself.
        opt = TrasMuon(params, lr=1e-3, use_triton=device.type == "cuda")
        ms = median_ms(opt.step, device)
        rows.append({"suite": "step", "case": model, "impl": "authors-trasmuon", "median_ms": ms,
                     "dtype": str(dtype), **environment(device)})
        print(f"{model}: {ms:.3f} ms")
        del opt, params
    args.out.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
