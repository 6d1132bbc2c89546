"""The eager Newton-Schulz on the CPU: PyTorch's native bf16 matmul against the float32
emulation of the same arithmetic (``reference.newton_schulz(..., cpu_products=...)``), and
which one this CPU picks by default (``reference.default_cpu_products``).

    python bench/cpu_newton_schulz.py --json bench/results/cpu_newton_schulz_<cpu>.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timing import median_ms  # noqa: E402
from trasmuon import reference as ref  # noqa: E402

SHAPES = ((256, 256), (768, 768), (768, 3072), (1024, 1024))


def cpu_flags() -> dict[str, bool]:
    cpu = torch.cpu
    out = {}
    for name in ("_is_avx2_supported", "_is_avx512_supported", "_is_avx512_bf16_supported",
                 "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        probe = getattr(cpu, name, None)
        out[name.removeprefix("_is_").removesuffix("_supported")] = bool(probe()) if probe else False
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    schedule = ref.ns_schedule(ref.TRASMUON_NS_COEFFICIENTS, 5)
    rows = []
    for shape in SHAPES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        row = {"shape": list(shape)}
        for mode in ref.CPU_PRODUCTS:
            row[f"{mode}_ms"] = median_ms(
                lambda mode=mode, x=x: ref.newton_schulz(x, schedule, 1e-8, torch.bfloat16, cpu_products=mode),
                "cpu")
        rows.append(row)
        print(f"{shape[0]:5d}x{shape[1]:<5d} emulated {row['emulated_ms']:8.2f} ms  native "
              f"{row['native_ms']:8.2f} ms")
    result = {"machine": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(),
              "default": ref.default_cpu_products(torch.bfloat16), "threads": args.threads,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(f"this CPU picks: {result['default']} ({result['cpu_flags']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
