"""The short table bench/run_gpu.sh prints last, from the files it wrote under one directory.

    python bench/gpu_summary.py OUT_DIR

Reads (each optional) ``status.tsv`` (part, exit status, seconds), ``newton_schulz.json``
(bench/gpu_newton_schulz.py), ``memory_passes.json`` (bench/gpu_memory_passes.py) and
``step.json`` (bench/gpu_step.py), ``profile_step.json`` (bench/gpu_profile_step.py),
prints one table per file, and writes the same text to ``summary.txt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ms(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def summary(out: Path) -> str:
    lines: list[str] = []
    status = out / "status.tsv"
    if status.exists():
        lines.append("part                     status   seconds")
        for line in status.read_text().splitlines():
            name, rc, secs = [*line.split("\t"), "", ""][:3]
            state = "ok" if rc == "0" else ("TIMEOUT" if rc in ("124", "137") else f"rc {rc}")
            lines.append(f"{name:24s} {state:8s} {secs:>7s}")
    env = None
    ns = _load(out / "newton_schulz.json")
    if ns:
        env = ns.get("env")
        lines += ["", f"Newton-Schulz, 5 steps (bf16 matmul rate {ns.get('bf16_matmul_tflops', 0):.0f} TFLOP/s; "
                      "floor = symmetric FLOPs at that rate)",
                  f"{'shape':>14s} {'ours ms':>9s} {'floor ms':>9s} {'of floor':>8s} {'torch-muon ms':>13s} {'speedup':>7s}"]
        by_shape: dict[str, dict[str, dict]] = {}
        for row in ns.get("rows", []):
            by_shape.setdefault("x".join(map(str, row["shape"])), {})[row["impl"]] = row
        for shape, impls in by_shape.items():
            ours, torch_muon = impls.get("ours-bf16-in", {}), impls.get("torch-muon", {})
            speed = (torch_muon.get("median_ms") / ours["median_ms"]
                     if ours.get("median_ms") and torch_muon.get("median_ms") else None)
            frac = ours.get("fraction_of_floor")
            skipped = "  skipped (budget)" if any(
                r.get("error", "").startswith("skipped") for r in impls.values()) else ""
            lines.append(f"{shape:>14s} {_ms(ours.get('median_ms')):>9s} {_ms(ours.get('floor_ms_symmetric')):>9s} "
                         f"{(f'{frac:.0%}' if frac else '-'):>8s} {_ms(torch_muon.get('median_ms')):>13s} "
                         f"{(f'{speed:.2f}x' if speed else '-'):>7s}{skipped}")
    mem = _load(out / "memory_passes.json")
    if mem:
        env = env or mem.get("env")
        checked = [r for r in mem.get("parity", []) if "error" not in r]
        failed = [r for r in checked if not r.get("within_tolerance")]
        skipped = len(mem.get("parity", [])) - len(checked)
        lines += ["", f"Memory passes (copy {mem.get('copy_gbs', 0):.0f} GB/s; parity "
                      f"{len(checked) - len(failed)}/{len(checked)} within tolerance"
                      + (f", {skipped} shapes skipped" if skipped else "") + ")",
                  f"{'pass':42s} {'shape':>12s} {'ms':>8s} {'GB/s':>7s} {'of copy':>7s}"]
        for row in mem.get("passes", []):
            frac = row.get("fraction_of_copy")
            gbs = f"{row['gbs']:.0f}" if "gbs" in row else "-"
            shape = "x".join(map(str, row["shape"]))
            lines.append(f"{row['pass']:42s} {shape:>12s} {_ms(row.get('median_ms')):>8s} "
                         f"{gbs:>7s} {(f'{frac:.0%}' if frac else '-'):>7s}"
                         + (f"  {row['error'][:60]}" if "error" in row else ""))
    step = _load(out / "step.json")
    if step:
        env = env or step.get("env")
        lines += ["", "Whole optimizer step (bf16 params; floor: symmetric NS FLOPs at the measured "
                      "matmul rate + bytes at the measured copy bandwidth)",
                  f"{'model':12s} {'impl':22s} {'ms':>9s} {'vs torch-muon':>13s} {'vs eager':>8s} "
                  f"{'floor ms':>8s} {'replay vs eager':>15s}"]
        for row in step.get("rows", []):
            vs_t, vs_e = row.get("speedup_vs_torch-muon"), row.get("speedup_vs_trasmuon")
            check = row.get("graph_check")
            lines.append(f"{row['model']:12s} {row['impl']:22s} "
                         + (f"{row['median_ms']:9.3f} {(f'{vs_t:.2f}x' if vs_t else '-'):>13s} "
                            f"{(f'{vs_e:.2f}x' if vs_e else '-'):>8s} {row.get('floor_ms', 0):8.3f} "
                            f"{(f'{check:.1e}' if check is not None else '-'):>15s}"
                            if "median_ms" in row else f"{'-':>9s}  {row.get('error', '')[:60]}"))
    prof = _load(out / "profile_step.json")
    if prof:
        env = env or prof.get("env")
        rates = prof.get("rates", {})
        lines += ["", f"One {prof.get('model')} {prof.get('impl')} step under torch.profiler: "
                      f"{prof.get('device_us_per_step', 0):.0f} us of device time; floor: bytes at "
                      f"{rates.get('copy_gbs', 0):.0f} GB/s, NS FLOPs at {rates.get('matmul_tflops', 0):.0f} "
                      f"TFLOP/s ({rates.get('source', 'no')} rates)",
                  f"{'kernel':48s} {'calls':>6s} {'us':>9s} {'share':>6s} {'floor us':>9s} {'of floor':>8s}"]
        for row in prof.get("kernels", [])[:12]:
            frac, floor = row.get("fraction_of_floor"), row.get("floor_us")
            lines.append(f"{row['kernel'][:48]:48s} {row['calls_per_step']:6.1f} {row['us_per_step']:9.1f} "
                         f"{row['share']:6.1%} {(f'{floor:.1f}' if floor is not None else '-'):>9s} "
                         f"{(f'{frac:.0%}' if frac is not None else '-'):>8s}")
    if env:
        lines.insert(0, f"{env.get('device')}: torch {env.get('torch')}, triton {env.get('triton')}, "
                        f"CUDA {env.get('cuda')}, driver {env.get('driver')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else ".")
    text = summary(out)
    print(text)
    (out / "summary.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
