"""Collectives and bytes per optimizer step and rank around Newton–Schulz: ours (the planned
exchange of ``trasmuon.layout``) against Dion's Muon/NorMuon pattern, for three model
structures at 8, 64 and 512 ranks under FSDP2, HSDP and FSDP2+TP. Planning only: no process
group, no tensor of a matrix's size.

    python bench/exchange_volume.py --json bench/results/exchange_volume.json \\
        --markdown bench/results/exchange_volume.md

Ours, per step and process group (the TrasMuon rule, Triton backend: X and O in bf16, O's row
sums of squares in fp32): the agreement all-reduce (17 + 4 bytes per parameter, uint8), one
all-to-all of X, one of O, and the all-reduce of the sums over rows of sharded matrices
((d_in + 1) fp32 per matrix). Bytes "sent" are the all-to-all parts a rank sends to other
ranks (``ExchangePlan.totals``); the all-reduce payloads are listed apart (what a ring moves is
about twice the payload).

Dion (NorMuon/Muon under FSDP2): per (shape, placements) group of n matrices, batches of W
(the shard group) matrices, the last padded with zero matrices; per batch one all-to-all sends
every rank's ``torch.chunk`` shard of each matrix to its owner (one matrix per rank) and one
sends O's shards back, in bf16. Dion needs no other collective for these rules (its NorMuon
normalizes per shard), so its count is 2 per batch. Dion's current release batches a whole
shape group at once ("megabatch": padded to a multiple of W, same bytes), 2 per shape group;
both counts are reported. Under HSDP Dion exchanges within the shard group only (each replica
group orthogonalizes every matrix itself); tensor parallelism is not supported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trasmuon.distributed import AGREEMENT_HEADER_BYTES, ns_flops, shard_rows  # noqa: E402
from trasmuon.layout import ExchangeEntry, ExchangePlan, Piece, matrix_layout  # noqa: E402
from trasmuon.plan import ceil_div, split_counts  # noqa: E402

WORLDS = (8, 64, 512)
LAYOUTS = ("fsdp2", "hsdp", "fsdp_tp")
NODE = 8  # ranks per node: HSDP's shard group, the TP degree, and what "inter-node" means
NS_STEPS = 5  # TrasMuon's default
X_ITEMSIZE = 2  # bf16: what the Triton backend (and Dion) send
ROW_SUM_ITEMSIZE = 4  # fp32 row sums of squares of O, which TrasMuon's rule needs
STATE_ITEMSIZE = 4  # fp32 sums over rows (fp32 parameters)
MB = 1e6


@dataclass(frozen=True)
class Matrix:
    """One 2-D parameter, (out, in), and its tensor-parallel style."""

    name: str
    shape: tuple[int, int]
    tp: str  # "colwise", "rowwise" or "replicate" (FSDP only, over the data-parallel dim)


def gpt2_small() -> list[Matrix]:
    d, out = 768, []
    for i in range(12):
        out += [Matrix(f"h{i}.{n}", (d, d), "colwise") for n in ("q", "k", "v")]
        out += [Matrix(f"h{i}.o", (d, d), "rowwise"),
                Matrix(f"h{i}.up", (4 * d, d), "colwise"),
                Matrix(f"h{i}.down", (d, 4 * d), "rowwise")]
    return out


def llama3_8b() -> list[Matrix]:
    d, kv, ffn, out = 4096, 8 * 128, 14336, []
    for i in range(32):
        out += [Matrix(f"l{i}.q", (d, d), "colwise"), Matrix(f"l{i}.k", (kv, d), "colwise"),
                Matrix(f"l{i}.v", (kv, d), "colwise"), Matrix(f"l{i}.o", (d, d), "rowwise"),
                Matrix(f"l{i}.w1", (ffn, d), "colwise"), Matrix(f"l{i}.w3", (ffn, d), "colwise"),
                Matrix(f"l{i}.w2", (d, ffn), "rowwise")]
    return out


def moe_64() -> list[Matrix]:
    d, ffn, experts, out = 2048, 1408, 64, []
    for i in range(16):
        out += [Matrix(f"l{i}.{n}", (d, d), "colwise") for n in ("q", "k", "v")]
        out += [Matrix(f"l{i}.o", (d, d), "rowwise"),
                Matrix(f"l{i}.router", (experts, d), "replicate")]
        for e in range(experts):
            out += [Matrix(f"l{i}.e{e}.w1", (ffn, d), "colwise"),
                    Matrix(f"l{i}.e{e}.w3", (ffn, d), "colwise"),
                    Matrix(f"l{i}.e{e}.w2", (d, ffn), "rowwise")]
    return out


MODELS = {"gpt2-small": gpt2_small, "llama3-8b": llama3_8b, "moe-64x": moe_64}


def mesh_and_placements(layout: str, world: int, tp: str) -> tuple[tuple[int, ...], tuple]:
    if layout == "fsdp2":
        return (world,), (Shard(0),)
    mesh = (world // NODE, NODE)
    if layout == "hsdp":
        return mesh, (Replicate(), Shard(0))
    # FSDP2 over TP: the data-parallel dim shards dim 0 again, inside each TP shard of a
    # colwise weight (hence strided), or dim 0 of a rowwise one (TP holds dim 1).
    styles = {"colwise": (_StridedShard(0, split_factor=NODE), Shard(0)),
              "rowwise": (Shard(0), Shard(1)),
              "replicate": (Shard(0), Replicate())}
    return mesh, styles[tp]


def buckets(matrices: Sequence[Matrix], layout: str, world: int
            ) -> list[tuple[tuple[int, int], tuple[int, ...], tuple, int]]:
    """(shape, mesh shape, placements, count) in order of first appearance, as the optimizer
    buckets one param group (same shape and placements)."""
    counts: dict[tuple, int] = {}
    for m in matrices:
        mesh, placements = mesh_and_placements(layout, world, m.tp)
        key = (m.shape, mesh, placements)
        counts[key] = counts.get(key, 0) + 1
    return [(*key, n) for key, n in counts.items()]


def _inter_node(pieces: list[Piece], world: int) -> list[int]:
    sent = [0] * world
    for p in pieces:
        if p.src // NODE != p.dst // NODE:
            sent[p.src] += p.nbytes
    return sent


def ours(matrices: Sequence[Matrix], layout: str, world: int) -> dict[str, Any]:
    """Our step over one process group of ``world`` ranks, planned as StepExchange does."""
    ranks = list(range(world))
    loads = [0.0] * world  # shared by all buckets of the group: FLOP-balanced ownership
    entries, row_floats = [], 0
    for shape, mesh, placements, count in buckets(matrices, layout, world):
        lay = matrix_layout(shape, mesh, placements, ranks, ranks)
        ranges = split_counts(count, world, loads, ns_flops(shape, NS_STEPS))
        owners = tuple(r for r, (s0, s1) in enumerate(ranges) for _ in range(s0, s1))
        entries.append(ExchangeEntry(lay, owners, X_ITEMSIZE, ROW_SUM_ITEMSIZE))
        if not lay.whole_everywhere:
            row_floats += count * (shape[1] + 1)  # column energies + ||O_base||_F^2
    plan = ExchangePlan(entries, world)
    sent_x, _ = plan.totals(plan.inputs)
    sent_o, _ = plan.totals(plan.outputs)
    sent = [a + b for a, b in zip(sent_x, sent_o, strict=True)]
    inter = [a + b for a, b in zip(_inter_node(plan.inputs, world),
                                   _inter_node(plan.outputs, world), strict=True)]
    owned = [sum(o == r for e in entries for o in e.owners) for r in ranks]
    return {
        "collectives": 4,  # agreement, all-to-all X, all-to-all O, all-reduce of row sums
        "sent_max": max(sent), "sent_mean": sum(sent) / world,
        "sent_x_max": max(sent_x), "sent_o_max": max(sent_o),
        "busiest_rank": sent.index(max(sent)),
        "inter_node_max": max(inter), "inter_node_mean": sum(inter) / world,
        "agreement_payload": AGREEMENT_HEADER_BYTES + 4 * len(matrices),
        "rows_allreduce_payload": row_floats * STATE_ITEMSIZE,
        "owners_max": max(owned), "owners_idle": sum(n == 0 for n in owned),
        "buckets": len(entries),
    }


def dion(matrices: Sequence[Matrix], layout: str, world: int) -> dict[str, Any] | None:
    """Dion's all-to-all pattern over its shard group (None: layout not supported)."""
    if layout == "fsdp_tp":
        return None
    group = world if layout == "fsdp2" else NODE
    counts: dict[tuple[int, int], int] = {}
    for m in matrices:
        counts[m.shape] = counts.get(m.shape, 0) + 1
    sent, inter = [0] * group, [0] * group
    batches = 0
    for (d_out, d_in), n in counts.items():
        b = ceil_div(n, group)
        batches += b
        shard = [(r1 - r0) * d_in for r0, r1 in shard_rows(d_out, group)]
        numel = d_out * d_in
        for r in range(group):
            node = range(r // NODE * NODE, min(r // NODE * NODE + NODE, group))
            # X: its shard of the W - 1 matrices others own; O: its matrix's shards of others
            sent[r] += b * X_ITEMSIZE * ((group - 1) * shard[r] + numel - shard[r])
            if layout == "fsdp2" and group > NODE:
                on_node = sum(shard[k] for k in node)
                inter[r] += b * X_ITEMSIZE * ((group - len(node)) * shard[r] + numel - on_node)
    return {
        "collectives": 2 * batches, "collectives_megabatch": 2 * len(counts),
        "exchange_group": group,
        "sent_max": max(sent), "sent_mean": sum(sent) / group,
        "inter_node_max": max(inter), "inter_node_mean": sum(inter) / group,
    }


def run(models: Sequence[str], worlds: Sequence[int], layouts: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        matrices = MODELS[model]()
        for world in worlds:
            for layout in layouts:
                start = time.perf_counter()
                row = {"model": model, "world": world, "layout": layout,
                       "matrices": len(matrices), "ours": ours(matrices, layout, world),
                       "dion": dion(matrices, layout, world)}
                row["seconds"] = round(time.perf_counter() - start, 2)
                print(f"{model:11s} W={world:<4d} {layout:8s} {row['seconds']:6.1f} s", flush=True)
                rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    head = ("| model | W | layout | ours collectives | ours max MB sent | ours mean MB sent "
            "| Dion collectives | Dion max MB sent | Dion mean MB sent | Dion collectives (megabatch) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for row in rows:
        o, d = row["ours"], row["dion"]
        cells = [row["model"], str(row["world"]), row["layout"], str(o["collectives"]),
                 f"{o['sent_max'] / MB:.1f}", f"{o['sent_mean'] / MB:.1f}"]
        if d is None:
            cells += ["not supported"] + ["-"] * 3
        else:
            cells += [str(d["collectives"]), f"{d['sent_max'] / MB:.1f}",
                      f"{d['sent_mean'] / MB:.1f}", str(d["collectives_megabatch"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per optimizer step and rank; MB = 10^6 bytes sent to other ranks by the all-to-alls "
        "around Newton–Schulz (X and O in bf16; ours also O's fp32 row sums, TrasMuon rule). "
        "Ours: 4 collectives (agreement all-reduce, all-to-all X, all-to-all O, all-reduce of "
        "the sums over rows; payloads of the all-reduces in the JSON). Dion: 2 all-to-alls per "
        "batch of W same-shape matrices (padded), nothing else; megabatch: its current release, "
        "2 per shape group, same bytes. HSDP: ours exchanges over all W ranks, Dion within the "
        f"shard group of {NODE}. FSDP+TP: tp={NODE}, router (MoE) FSDP-only.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/exchange_volume.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "bench/results/exchange_volume.md")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--worlds", nargs="+", type=int, default=list(WORLDS))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args(argv)
    if any(w % NODE for w in args.worlds):
        parser.error(f"every world size must be a multiple of {NODE}")
    start = time.perf_counter()
    rows = run(args.models, args.worlds, args.layouts)
    result = {
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "assumptions": {
            "rule": "trasmuon", "ns_steps": NS_STEPS, "exchange_itemsize": X_ITEMSIZE,
            "row_sum_itemsize": ROW_SUM_ITEMSIZE, "ranks_per_node": NODE, "tp": NODE,
            "agreement_payload": f"{AGREEMENT_HEADER_BYTES} + 4 per matrix (AdamW params add 4 each)",
            "bytes": "all-to-all parts sent to other ranks, payload only",
        },
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    for path in (args.json, args.markdown):
        path.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    args.markdown.write_text(markdown(rows))
    print(markdown(rows))
    print(f"wrote {args.json} and {args.markdown} in {math.ceil(result['seconds'])} s")


if __name__ == "__main__":
    main()
