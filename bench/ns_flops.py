"""Newton–Schulz FLOPs per optimizer step, standard against Gram (docs/rule.md, "Gram
Newton–Schulz"), and the eager CPU time of one NS in each form.

FLOPs: ``reference.newton_schulz_flops`` (symmetric products counted as the kernels compute
them) over every hidden matrix of GPT-2 small, Llama-3.2-1B and Llama-3-8B (embeddings and
heads take AdamW), 5 steps, the Gram form with the default restart after step 2; "gram"
columns count each matrix in the form ``ns_method="gram"`` picks (``reference.uses_gram``).
Time: ``reference.newton_schulz`` and ``reference.gram_newton_schulz`` in bf16 (the CPU's
default product mode), one thread, median of ``--repeat`` runs.
Per head (docs/rule.md, "Per-head orthogonalization"): the attention projections of GPT-2
small, Llama-3.2-1B and Llama-3-8B orthogonalized whole against per head (``ns_blocks`` as
``split_params(ns_blocks="heads")`` sets them: rb * cb blocks of (d_out / rb) x (d_in / cb),
each ``newton_schulz_flops``), standard and with ``ns_method="gram"`` per block; the JSON's
"heads" entry. ``--time-shapes ''`` times nothing and keeps the times the JSON holds.

    python bench/ns_flops.py [--time-shapes 768x3072,2048x8192] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shapes import MODELS, llama3_8b
from bench.timing import write_json
from trasmuon import reference as ref

STEPS = 5
RESTARTS = ref.DEFAULT_NS_RESTARTS
DEFAULT_JSON = Path(__file__).parent / "results" / "ns_flops.json"


def model_flops(specs) -> dict:
    rows, std_total, gram_total, always_total = [], 0, 0, 0
    for shape, count, kind in specs:
        if kind != "matrix":
            continue
        d_out, d_in = shape
        std = ref.newton_schulz_flops(d_out, d_in, STEPS)
        gram = ref.newton_schulz_flops(d_out, d_in, STEPS, gram=True, restarts=RESTARTS)
        picked = gram if ref.uses_gram("gram", shape, STEPS, RESTARTS) else std
        rows.append({"shape": list(shape), "count": count, "aspect": max(shape) / min(shape),
                     "standard": std, "gram_always": gram, "gram": picked})
        std_total += count * std
        gram_total += count * picked
        always_total += count * gram
    return {"matrices": rows, "standard": std_total, "gram": gram_total,
            "gram_always": always_total, "gram_over_standard": gram_total / std_total}


# The attention projections of each model, (out, in) shape, count and ns_blocks per head
# (``split_params(ns_blocks="heads")``): q/k/v (and GPT-2's fused c_attn) by rows, the
# output projection by columns.
HEAD_MODELS = {
    "gpt2-small": [((2304, 768), 12, (36, 1)),        # c_attn: 3 x 12 heads of 64
                   ((768, 768), 12, (1, 12))],        # attn.c_proj
    "llama3.2-1b": [((2048, 2048), 16, (32, 1)),      # q_proj: 32 heads of 64
                    ((512, 2048), 32, (8, 1)),        # k_proj, v_proj: 8 KV heads
                    ((2048, 2048), 16, (1, 32))],     # o_proj
    "llama3-8b": [((4096, 4096), 32, (32, 1)),        # q_proj: 32 heads of 128
                  ((1024, 4096), 64, (8, 1)),         # k_proj, v_proj: 8 KV heads
                  ((4096, 4096), 32, (1, 32))],       # o_proj
}


def blocked_flops(shape: tuple[int, int], blocks: tuple[int, int], method: str) -> int:
    """NS FLOPs of one matrix orthogonalized as its ``blocks`` grid, each block in the form
    ``method`` ("standard" or "gram") picks for the block's shape."""
    bm, bn = ref.ns_block_shape(shape, blocks)
    gram = ref.uses_gram(method, (bm, bn), STEPS, RESTARTS)
    return blocks[0] * blocks[1] * ref.newton_schulz_flops(bm, bn, STEPS, gram=gram, restarts=RESTARTS)


def head_flops(name: str) -> dict:
    rows, whole, heads, heads_gram = [], 0, 0, 0
    for shape, count, blocks in HEAD_MODELS[name]:
        w = ref.newton_schulz_flops(*shape, STEPS)
        h = blocked_flops(shape, blocks, "standard")
        hg = blocked_flops(shape, blocks, "gram")
        rows.append({"shape": list(shape), "count": count, "ns_blocks": list(blocks),
                     "block": list(ref.ns_block_shape(shape, blocks)), "whole": w,
                     "per_head": h, "per_head_gram": hg, "per_head_over_whole": h / w})
        whole, heads, heads_gram = whole + count * w, heads + count * h, heads_gram + count * hg
    return {"matrices": rows, "whole": whole, "per_head": heads, "per_head_gram": heads_gram,
            "per_head_over_whole": heads / whole}


def time_ns(shape: tuple[int, int], repeat: int) -> dict:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    schedule = ref.ns_schedule(ref.TRASMUON_NS_COEFFICIENTS, STEPS)
    out = {"shape": list(shape), "cpu_products": ref.default_cpu_products(torch.bfloat16)}
    for name, fn in (("standard", lambda: ref.newton_schulz(x, schedule, 1e-7)),
                     ("gram", lambda: ref.gram_newton_schulz(x, schedule, 1e-7, restarts=RESTARTS))):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[f"{name}_s"] = statistics.median(times)
    out["gram_over_standard"] = out["gram_s"] / out["standard_s"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time-shapes", default="768x3072,2048x8192",
                    help="comma-separated MxN shapes to time ('' for none)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {
        "machine": platform.processor() or platform.machine(), "platform": platform.platform(),
        "torch": torch.__version__, "date": datetime.date.today().isoformat(),
        "threads": args.threads, "steps": STEPS, "restarts": list(RESTARTS),
        "models": {name: model_flops(specs) for name, specs in (
            ("gpt2-small", MODELS["gpt2-small"]), ("llama3.2-1b", MODELS["llama3.2-1b"]),
            ("llama3-8b", llama3_8b()))},
        "cpu_time": [],
    }
    print(f"NS FLOPs per optimizer step ({STEPS} steps, Gram restart after {RESTARTS}):")
    print(f"{'model':<13} {'standard':>10} {'gram':>10} {'ratio':>6} {'gram-always':>12}")
    for name, m in result["models"].items():
        print(f"{name:<13} {m['standard'] / 1e12:>8.2f} T {m['gram'] / 1e12:>8.2f} T "
              f"{m['gram_over_standard']:>6.3f} {m['gram_always'] / 1e12:>10.2f} T")
    result["heads"] = {name: head_flops(name) for name in HEAD_MODELS}
    print(f"\nAttention projections, NS FLOPs per optimizer step, whole vs per head ({STEPS} steps):")
    print(f"{'model':<13} {'matrix':>10} {'x':>3} {'ns_blocks':>9} {'block':>9} {'whole':>10} "
          f"{'per head':>10} {'ratio':>6} {'+gram':>10}")
    for name, h in result["heads"].items():
        for r in h["matrices"]:
            print(f"{name:<13} {'x'.join(map(str, r['shape'])):>10} {r['count']:>3} "
                  f"{'x'.join(map(str, r['ns_blocks'])):>9} {'x'.join(map(str, r['block'])):>9} "
                  f"{r['whole'] / 1e9:>8.2f} G {r['per_head'] / 1e9:>8.2f} G "
                  f"{r['per_head_over_whole']:>6.3f} {r['per_head_gram'] / 1e9:>8.2f} G")
        print(f"{name:<13} {'attention':>10} {'':>3} {'':>9} {'':>9} {h['whole'] / 1e12:>8.3f} T "
              f"{h['per_head'] / 1e12:>8.3f} T {h['per_head_over_whole']:>6.3f} "
              f"{h['per_head_gram'] / 1e12:>8.3f} T")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.time_shapes.split(",") if s]
    if not shapes and args.json.exists():  # keep the times measured before
        result["cpu_time"] = json.loads(args.json.read_text()).get("cpu_time", [])
    write_json(args.json, result)
    for shape in shapes:
        row = time_ns(shape, args.repeat)
        result["cpu_time"].append(row)
        print(f"CPU {shape[0]}x{shape[1]} ({args.threads} thread, bf16 {row['cpu_products']}): "
              f"standard {row['standard_s']:.3f} s, gram {row['gram_s']:.3f} s "
              f"({row['gram_over_standard']:.2f}x)")
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
