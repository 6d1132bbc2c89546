"""Wall time of one ``TrasMuon`` step (eager backend, bf16 Newton–Schulz) on CPU: one process
with plain tensors, and 4 gloo ranks with FSDP2-like DTensor parameters (``Shard(0)`` on a
1-D mesh), with the agreement all-reduce on (``check_consistency=True``, the default) and off.

    python bench/gloo_step_time.py --json bench/results/gloo_step_time.json

Model: 6 matrices of 256x256 and 2 of 512x256, float32, with fixed random gradients (DTensors
with the parameters' placements). Every process runs one thread. On the ranks, each step
starts after a barrier and its time is the slowest rank's; the optimizers with the agreement
on and off step in turn (alternating which goes first), so that both see the same machine
load and the agreement's cost is the median of the paired differences. A bare all-reduce of
the agreement's payload and a bare barrier are timed too, for scale.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import trasmuon
from trasmuon.distributed import AGREEMENT_HEADER_BYTES

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(256, 256)] * 6 + [(512, 256)] * 2
MS = 1e3


def make_params(mesh: Any = None) -> list[torch.nn.Parameter]:
    """The model's matrices with gradients, the same on every rank (seeded), distributed
    with ``(Shard(0),)`` when a mesh is given."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in SHAPES:
        weight = torch.randn(shape, generator=gen) * 0.02
        grad = torch.randn(shape, generator=gen) * 1e-3
        if mesh is not None:
            from torch.distributed.tensor import Shard, distribute_tensor

            placements = (Shard(0),)
            weight = distribute_tensor(weight, mesh, placements)
            grad = distribute_tensor(grad, mesh, placements)
        p = torch.nn.Parameter(weight)
        p.grad = grad
        params.append(p)
    return params


def make_optimizer(params: list[torch.nn.Parameter], check: bool) -> trasmuon.TrasMuon:
    return trasmuon.TrasMuon(params, backend="eager", ns_dtype=torch.bfloat16,
                             check_consistency=check)


def _median_ms(times: Sequence[float]) -> float:
    return statistics.median(times) * MS


def time_single(warmup: int, steps: int) -> dict[str, Any]:
    opt = make_optimizer(make_params(), check=True)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"step_ms": times}


def _bare_ms(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return _median_ms(times)


def time_ranks(rank: int, world: int, warmup: int, steps: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    opts = {check: make_optimizer(make_params(mesh), check) for check in (True, False)}
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(warmup + steps):
        for check in ((True, False) if i % 2 == 0 else (False, True)):
            dist.barrier()
            start = time.perf_counter()
            opts[check].step()
            if i >= warmup:
                times[check].append(time.perf_counter() - start)
    payload = torch.zeros(AGREEMENT_HEADER_BYTES + 4 * len(SHAPES), dtype=torch.uint8)
    return {
        "check_on_ms": times[True], "check_off_ms": times[False],
        "bare_allreduce_ms": _bare_ms(lambda: dist.all_reduce(payload, op=dist.ReduceOp.MAX), 50),
        "bare_barrier_ms": _bare_ms(dist.barrier, 50),
        "comm_stats": {str(check): {"calls": o.comm_stats.calls, "sent": o.comm_stats.sent}
                       for check, o in opts.items()},
    }


def _worker(rank: int, world: int, tmp: str, warmup: int, steps: int) -> None:
    torch.set_num_threads(1)
    if world == 1:
        result = time_single(warmup, steps)
    else:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}",
                                rank=rank, world_size=world)
        try:
            result = time_ranks(rank, world, warmup, steps)
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, result)
            result = {"ranks": gathered}
            dist.barrier()
        finally:
            dist.destroy_process_group()
    if rank == 0:
        Path(tmp, "result.json").write_text(json.dumps(result))


def launch(world: int, warmup: int, steps: int, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(world, tmp, warmup, steps), nprocs=world,
                                 join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                raise TimeoutError(f"{world} process(es) did not finish in {timeout:.0f} s")
        return json.loads(Path(tmp, "result.json").read_text())


def summarize(single: dict[str, Any], ranks: dict[str, Any], world: int) -> dict[str, Any]:
    per_rank = ranks["ranks"]
    # A step of the group takes as long as its slowest rank.
    on = [max(r["check_on_ms"][i] for r in per_rank) for i in range(len(per_rank[0]["check_on_ms"]))]
    off = [max(r["check_off_ms"][i] for r in per_rank) for i in range(len(per_rank[0]["check_off_ms"]))]
    return {
        "configs": [
            {"name": "1 process, plain tensors", "world": 1, "check_consistency": True,
             "median_ms": _median_ms(single["step_ms"]), "min_ms": min(single["step_ms"]) * MS},
            {"name": f"{world} ranks, Shard(0), check_consistency=True", "world": world,
             "check_consistency": True, "median_ms": _median_ms(on), "min_ms": min(on) * MS},
            {"name": f"{world} ranks, Shard(0), check_consistency=False", "world": world,
             "check_consistency": False, "median_ms": _median_ms(off), "min_ms": min(off) * MS},
        ],
        "agreement_ms": {
            "difference_of_medians": _median_ms(on) - _median_ms(off),
            "median_of_paired_differences": _median_ms([a - b for a, b in zip(on, off, strict=True)]),
            "bare_allreduce_median_over_ranks": statistics.median(r["bare_allreduce_ms"] for r in per_rank),
            "bare_barrier_median_over_ranks": statistics.median(r["bare_barrier_ms"] for r in per_rank),
        },
        "comm_stats_rank0_last_step": per_rank[0]["comm_stats"],
        "raw_ms": {"single": [t * MS for t in single["step_ms"]], "check_on_slowest_rank": [t * MS for t in on],
                   "check_off_slowest_rank": [t * MS for t in off]},
    }


def table(summary: dict[str, Any]) -> str:
    lines = ["| configuration | median step ms | min step ms |", "|---|---|---|"]
    for c in summary["configs"]:
        lines.append(f"| {c['name']} | {c['median_ms']:.1f} | {c['min_ms']:.1f} |")
    a = summary["agreement_ms"]
    lines += ["", f"agreement (on - off): {a['difference_of_medians']:.2f} ms (difference of medians), "
              f"{a['median_of_paired_differences']:.2f} ms (median of paired differences); bare "
              f"all-reduce of its payload {a['bare_allreduce_median_over_ranks']:.2f} ms, bare "
              f"barrier {a['bare_barrier_median_over_ranks']:.2f} ms"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/gloo_step_time.json")
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per launch")
    args = parser.parse_args(argv)
    # Forked from a server that imported these once: a spawned worker would import torch
    # again (seconds per process on a small machine).
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "trasmuon"])
    start = time.perf_counter()
    single = launch(1, args.warmup, args.steps, args.timeout)
    ranks = launch(args.world, args.warmup, args.steps, args.timeout)
    summary = summarize(single, ranks, args.world)
    result = {
        "machine": {"processor": platform.processor(), "machine": platform.machine(),
                    "platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version()},
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "setup": {"shapes": SHAPES, "dtype": "float32", "backend": "eager",
                  "ns_dtype": "bfloat16", "threads_per_process": 1, "warmup": args.warmup,
                  "steps": args.steps, "start_method": "forkserver", "dist_backend": "gloo"},
        "seconds": round(time.perf_counter() - start, 1),
        **summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(summary))
    print(f"wrote {args.json} in {result['seconds']} s")


if __name__ == "__main__":
    main()
