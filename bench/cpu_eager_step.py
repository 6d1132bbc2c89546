"""The eager step on the CPU beside torch.optim.Muon (+ AdamW for the other params) and the
other packages' Muons: GPT-2 small's parameter structure with 2 layers, fp32 params, one thread.

    python bench/cpu_eager_step.py --json bench/results/cpu_eager_step.json

Each implementation takes two untimed steps, then ``--rounds`` rounds in which every
implementation takes ``--steps`` timed steps in turn (interleaved, so that a shared machine's
slow phases hit all of them alike); the figure is the median over all timed steps. The
peers of other packages (bench/common.py's ``PEERS``: pytorch_optimizer's Muon and NorMuon,
heavyball's Muon, each with its defaults, heavyball's torch.compile included) step the
matrices, torch.optim.AdamW the rest; one not installed is listed under ``errors``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import PeerNotInstalled, make_params, make_step  # noqa: E402
from bench.shapes import gpt2  # noqa: E402
from bench.timing import write_json  # noqa: E402

IMPLS = ("muon", "torch-muon", "normuon", "trasmuon", "namo_d", "pto-muon", "pto-normuon",
         "heavyball-muon")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    specs = gpt2(2, 768)
    steps, errors = {}, {}
    for impl in args.impls.split(","):
        matrices, others = make_params(specs, "cpu", torch.float32)
        try:
            step, _ = make_step(impl, matrices, others)
        except PeerNotInstalled as exc:
            errors[impl] = str(exc)
            print(f"{impl:14s} {exc}")
            continue
        step()  # (heavyball compiles here)
        step()
        steps[impl] = step
    samples: dict[str, list[float]] = {impl: [] for impl in steps}
    for _ in range(args.rounds):
        for impl, step in steps.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                samples[impl].append((time.perf_counter() - t0) * 1e3)
    result = {"structure": "gpt2 2 x 768, fp32", "threads": 1, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "median_ms": {impl: statistics.median(s) for impl, s in samples.items()}}
    if errors:
        result["errors"] = errors
    for impl, ms in result["median_ms"].items():
        print(f"{impl:14s} {ms:8.1f} ms per step")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
