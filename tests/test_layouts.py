"""Every DTensor layout torch's parallel APIs produce, on 4 gloo ranks (a 2x2 mesh and a 1-D
mesh), against one process given the same gradients: HSDP, tensor parallelism (Shard(0) and
Shard(1)), FSDP2 over TP (``_StridedShard``), all matrix rules, both backends; the number of
collectives of a step; the input exchange posted before any Newton-Schulz runs; and
``fully_shard`` / ``parallelize_module`` as a user calls them.

One 4-process worker runs every case (starting processes is what costs on CI's two cores);
the shapes are tiny and uneven (empty shards included).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from trasmuon import NAMO, TrasMuon
from trasmuon.layout import dtensor_ranges

from .test_distributed import read_report, run_workers, write_report

WORLD = 4
STEPS = 4
EAGER_RTOL = 1e-5  # float64 Newton-Schulz: only the order of the sums over rows differs
SHAPES = {"a": (7, 10), "b": (12, 5), "c": (6, 9), "d": (9, 6), "e": (5, 11), "f": (10, 7),
          "g": (3, 12), "i": (9, 5), "j": (11, 6)}
# stacked=True (5 experts, (E, out, in) and (E, in, out)) on every layout: sharded over
# experts only, each rank orthogonalizes its own; sharded inside them, they go through the
# exchange. flatten=True (a conv weight) on the layouts that shard dim 0 only.
STACKS = {"x": (5, 4, 6), "y": (5, 6, 4)}
DIM0 = {"h": (5, 3, 2, 2)}


def _placements() -> dict[str, tuple[tuple[int, ...], tuple]]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return {
        "hsdp": ((2, 2), (Replicate(), Shard(0))),
        "fsdp+tp colwise": ((2, 2), (_StridedShard(0, split_factor=2), Shard(0))),
        "fsdp+tp rowwise": ((2, 2), (Shard(0), Shard(1))),
        "dp+tp rowwise": ((2, 2), (Replicate(), Shard(1))),
        # torchtitan's EP under FSDP2 when dp * ep exceeds the experts: a stack's dim 1 over
        # dp, its experts over ep (a 2-D matrix: columns over dp, rows over ep).
        "ep+fsdp inside experts": ((2, 2), (Shard(1), Shard(0))),
        "tp rowwise": ((4,), (Shard(1),)),
        "replicated": ((4,), (Replicate(),)),
    }


def _groups(params: dict[str, torch.Tensor], ns_dtype: torch.dtype) -> list[dict]:
    p = params
    conv = [{"params": [p["h"]], "ns_dtype": ns_dtype, "flatten": True}] if "h" in p else []
    stacks = [{"params": [p["x"]], "ns_dtype": ns_dtype, "stacked": True},
              {"params": [p["y"]], "rule": "normuon", "ns_dtype": ns_dtype, "stacked": True,
               "orientation": "in_out"}]
    return [
        *conv,
        *stacks,
        {"params": [p["a"], p["b"]], "ns_dtype": ns_dtype},
        {"params": [p["g"]], "ns_dtype": ns_dtype, "energy_source": "update"},
        {"params": [p["i"]], "ns_dtype": ns_dtype, "orientation": "in_out"},  # (in, out) stored
        {"params": [p["c"]], "rule": "normuon", "ns_dtype": ns_dtype},
        {"params": [p["d"]], "rule": "muon", "ns_dtype": ns_dtype, "nesterov": True},
        {"params": [p["e"]], "rule": "namo", "ns_dtype": ns_dtype},
        {"params": [p["f"]], "rule": "namo_d", "ns_dtype": ns_dtype, "clamp": 0.5},
        {"params": [p["j"]], "rule": "muon_rows", "ns_dtype": ns_dtype},  # the example rule
    ]


def _grads(step: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    out = {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}
    if step >= 3:  # a burst on two columns: the gate engages
        for g in out.values():
            g[:, :2] *= 30.0
    return out


def distribute(full: torch.Tensor, mesh, placements):
    """``full`` as a DTensor: this rank's block by torch's own local shape and offset (which
    ``distribute_tensor`` cannot give an uneven ``_StridedShard``)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    block = full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
    return DTensor.from_local(block.contiguous(), mesh, placements, run_check=False,
                              shape=full.shape, stride=full.stride())


def _run_layout(name: str, mesh, placements, backend: str, events: list[str]) -> dict:
    from torch.distributed.tensor import DTensor

    shapes = dict(SHAPES, **STACKS)
    if all(getattr(pl, "dim", 0) == 0 for pl in placements):
        shapes.update(DIM0)
    gen = torch.Generator().manual_seed(0)
    start = {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}
    ref = {k: nn.Parameter(v.clone()) for k, v in start.items()}
    mine = {k: nn.Parameter(distribute(v.clone(), mesh, placements)) for k, v in start.items()}
    ns_dtype = torch.float64 if backend == "eager" else torch.bfloat16
    hp = dict(lr=0.02, weight_decay=0.1, warmup_steps=1, clip_period=1, backend=backend)
    if backend == "triton":
        hp["ns_steps"] = 3
    opt = TrasMuon(_groups(mine, ns_dtype), **hp)
    ref_opt = TrasMuon(_groups(ref, ns_dtype), **hp)
    worst = 0.0
    calls = []
    for step in range(1, STEPS + 1):
        grads = _grads(step, shapes)
        for k in shapes:
            ref[k].grad = grads[k].clone()
            mine[k].grad = distribute(grads[k].clone(), mesh, placements)
        ref_opt.step()
        events.clear()
        opt.step()
        calls.append(dict(opt.comm_stats.calls))
        if backend == "triton":
            assert all(b.backend == "triton" for b in opt._plan.buckets), name
        for k in shapes:
            got, want = mine[k].full_tensor().detach(), ref[k].detach()
            if backend == "eager":
                rel = float((got - want).norm() / want.norm())
            else:  # relative to the distance moved (bf16 Newton-Schulz)
                rel = float((got - want).norm() / (want - start[k]).norm())
            worst = max(worst, rel)
            assert rel < (EAGER_RTOL if backend == "eager" else 5e-2), (name, backend, step, k, rel)
            if backend == "eager":
                for key, value in opt.state[mine[k]].items():
                    value = value.full_tensor() if isinstance(value, DTensor) else value
                    torch.testing.assert_close(value, ref_opt.state[ref[k]][key], rtol=EAGER_RTOL,
                                               atol=1e-7, msg=lambda m, k=k, key=key: f"{name} {k} {key}: {m}")
    if backend == "eager":
        assert ref_opt.state[ref["a"]]["c_ema"].min() < 0.99  # the gate did engage
    return {"worst": worst, "calls": calls, "events": list(events)}


def _layouts_worker(rank: int, world: int, tmp: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    import trasmuon.rules._matrix as matrix

    # Record the order of the exchange's all-to-alls and of Newton-Schulz runs.
    events: list[str] = []
    all_to_all, eager_ns = dist.all_to_all_single, matrix.eager_newton_schulz

    def recording_all_to_all(*args, **kwargs):
        events.append("all_to_all")
        return all_to_all(*args, **kwargs)

    def recording_ns(bucket, x):
        events.append("ns")
        return eager_ns(bucket, x)

    dist.all_to_all_single = recording_all_to_all
    matrix.eager_newton_schulz = recording_ns
    meshes = {}
    report = {}
    for name, (shape, placements) in _placements().items():
        mesh = meshes.get(shape) or meshes.setdefault(shape, init_device_mesh("cpu", shape))
        # Triton on the layout that shards rows and columns and stacks inside their experts
        # (the exchange's code is the same for every layout; eager runs all of them).
        backends = ("eager", "triton") if name == "ep+fsdp inside experts" else ("eager",)
        for backend in backends:
            report[f"{name} {backend}"] = _run_layout(name, mesh, placements, backend, events)
    dist.all_to_all_single, matrix.eager_newton_schulz = all_to_all, eager_ns
    report["refused stack"] = _refused_stack(meshes[(4,)])
    report["torch apis"] = _torch_apis(meshes[(2, 2)])
    report["checkpoints"] = _checkpoints_across_layouts(meshes[(2, 2)], tmp)
    write_report(tmp, report)


def _refused_stack(mesh) -> str:
    """A stack whose experts' rows interleave between ranks (a _StridedShard alone) is not
    a grid of blocks: refused when the optimizer is built, naming the parameter."""
    from torch.distributed.tensor.placement_types import _StridedShard

    w = nn.Parameter(distribute(torch.randn(5, 8, 6), mesh, (_StridedShard(1, split_factor=2),)))
    with pytest.raises(NotImplementedError, match="non-contiguous") as info:
        TrasMuon([{"params": [w], "stacked": True}], lr=0.02)
    return str(info.value)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 10, bias=False)
        self.down = nn.Linear(10, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _checkpoints_across_layouts(mesh, tmp: str) -> dict:
    """DCP checkpoints that move between layouts: HSDP 2x2 saved after step 2, loaded by
    FSDP2 on 4 ranks, which saves after step 3, loaded by one process for step 4; FSDP2 over
    TP (2x2) and TP over 2 ranks saved after step 2 and loaded by one process. Every
    continued run matches the uninterrupted one within 1e-6 relative (float64
    Newton-Schulz)."""
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    fully_shard = _fully_shard()
    named = DeviceMesh("cpu", mesh.mesh, mesh_dim_names=("dp", "tp"))
    flat = init_device_mesh("cpu", (WORLD,))
    kw = dict(lr=0.02, weight_decay=0.1, warmup_steps=1, clip_period=1, clip_min_cols=2,
              ns_dtype=torch.float64)

    def build(layout: str, seed: int):
        torch.manual_seed(seed)
        model = MLP()
        if layout == "hsdp":
            fully_shard(model.up, mesh=named)
            fully_shard(model, mesh=named)
        elif layout == "fsdp2":
            fully_shard(model.up, mesh=flat)
            fully_shard(model, mesh=flat)
        elif layout == "tp":  # TP over 2 ranks; the two dp rows are replicas of each other
            parallelize_module(model, named["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        elif layout == "fsdp+tp":
            parallelize_module(model, named["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
            fully_shard(model.up, mesh=named["dp"])
            fully_shard(model, mesh=named["dp"])
        return model, TrasMuon(model.parameters(), **kw)

    def train(model, opt, steps) -> None:
        for step in steps:
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))  # every rank
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

    def weights(model) -> list[torch.Tensor]:
        return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for p in model.parameters()]

    def save(model, opt, path) -> None:
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=path)

    def load(model, opt, path, no_dist=False) -> None:
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=path, no_dist=no_dist)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])

    def worst(got, want) -> float:
        return max(float((a - b).norm() / b.norm()) for a, b in zip(got, want, strict=True))

    out = {}
    for first in ("hsdp", "fsdp+tp", "tp"):
        model, opt = build(first, 0)
        train(model, opt, range(1, 5))
        uninterrupted = weights(model)
        model, opt = build(first, 0)
        train(model, opt, range(1, 3))
        path = os.path.join(tmp, f"ckpt-{first.replace('+', '')}")
        save(model, opt, path)
        errors = {}
        if first == "hsdp":  # -> FSDP2 on 4 ranks for step 3, saved again
            model, opt = build("fsdp2", 1)
            load(model, opt, path)
            train(model, opt, [3])
            path = os.path.join(tmp, "ckpt-fsdp2")
            save(model, opt, path)
            train(model, opt, [4])
            errors["fsdp2"] = worst(weights(model), uninterrupted)
        dist.barrier()
        if dist.get_rank() == 0:  # -> one process, plain tensors
            model, opt = build("single", 1)
            load(model, opt, path, no_dist=True)
            train(model, opt, [4] if first == "hsdp" else [3, 4])
            errors["one process"] = worst(weights(model), uninterrupted)
            assert all(e < 1e-6 for e in errors.values()), (first, errors)
        dist.barrier()
        out[first] = errors
    return out


def _torch_apis(mesh) -> dict:
    """``fully_shard`` on a 2-D mesh (HSDP) and ``parallelize_module`` then ``fully_shard``
    over dp (FSDP2 + TP), trained as a user would, against one process on the same (full)
    gradients; NAMO on the TP model (no distributed class has to exist for it)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    fully_shard = _fully_shard()
    out = {}
    full_mesh = DeviceMesh("cpu", mesh.mesh, mesh_dim_names=("dp", "tp"))
    dp, tp = full_mesh["dp"], full_mesh["tp"]
    for mode in ("hsdp", "fsdp+tp"):
        torch.manual_seed(0)
        ref_model = MLP()
        model = copy.deepcopy(ref_model)
        if mode == "hsdp":
            fully_shard(model.up, mesh=full_mesh)
            fully_shard(model, mesh=full_mesh)
        else:
            parallelize_module(model, tp, {"up": ColwiseParallel(), "down": RowwiseParallel()})
            fully_shard(model.up, mesh=dp)
            fully_shard(model, mesh=dp)
        kw = dict(lr=0.02, ns_dtype=torch.float64)
        opt, ref_opt = NAMO(model.parameters(), **kw), NAMO(ref_model.parameters(), **kw)
        placements = {n: str(tuple(p.placements)) for n, p in model.named_parameters()}
        worst = 0.0
        for step in range(1, 4):
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
            model(x).square().mean().backward()
            ref_model(x).square().mean().backward()
            # One process gets the distributed run's (dp-averaged) gradients.
            for p, rp in zip(model.parameters(), ref_model.parameters(), strict=True):
                rp.grad = p.grad.full_tensor().clone()
            opt.step()
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
            for p, rp in zip(model.parameters(), ref_model.parameters(), strict=True):
                assert isinstance(p, DTensor)
                rel = float((p.full_tensor() - rp).norm() / rp.norm())
                worst = max(worst, rel)
                assert rel < EAGER_RTOL, (mode, step, rel)
        out[mode] = {"placements": placements, "worst": worst}
    return out


def test_every_layout_equals_one_process(tmp_path):
    """All layouts on 4 ranks against one process: eager (float64 Newton-Schulz) within
    1e-5 relative, weights and every state entry; Triton (interpreted, bf16 Newton-Schulz)
    within bf16 noise of the single-process Triton run, never falling back to eager."""
    run_workers(_layouts_worker, WORLD, tmp_path, timeout=600)
    report = read_report(tmp_path)
    for name, values in report.items():
        if name in ("torch apis", "checkpoints", "refused stack"):
            continue
        steady = values["calls"][-1]
        # A steady step: the agreement, the two all-to-alls and the all-reduce of the sums
        # over rows (a replicated layout needs none).
        assert sum(steady.values()) <= 4, (name, steady)
        assert steady.get("all_to_all(O)") == 1, (name, steady)
        if name.startswith("replicated"):  # every owner holds its inputs: nothing to send
            assert "all_to_all(X)" not in steady, (name, steady)
            continue
        assert steady.get("all_to_all(X)") == 1, (name, steady)
        if name.endswith("eager"):
            events = values["events"]
            # The inputs are posted before any Newton-Schulz runs, O's blocks after.
            assert events[0] == "all_to_all" and events[-1] == "all_to_all", (name, events)
            assert "ns" in events[1:-1], (name, events)
        print(f"\n{name}: worst relative difference {values['worst']:.2e}; steady step {steady}")
    assert "parameter 0 of param group 0" in report["refused stack"], report["refused stack"]
    apis = report["torch apis"]
    assert "_StridedShard" in apis["fsdp+tp"]["placements"]["up.weight"]
    assert "Shard(dim=1)" in apis["fsdp+tp"]["placements"]["down.weight"]
    assert "Replicate()" in apis["hsdp"]["placements"]["up.weight"]
    print("torch APIs:", apis)
    print("checkpoints across layouts (worst relative weight difference):", report["checkpoints"])


@pytest.mark.parametrize("placements", ["hsdp", "fsdp+tp colwise", "fsdp+tp rowwise", "tp rowwise"])
def test_blocks_are_what_torch_computes(placements):
    """The blocks of ``trasmuon.layout`` are DTensor's own local shapes and offsets."""
    import itertools

    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    mesh_shape, pl = _placements()[placements]
    for shape in SHAPES.values():
        ranges = dtensor_ranges(shape, mesh_shape, pl)
        for coordinate, mine in zip(itertools.product(*map(range, mesh_shape)), ranges, strict=True):
            local_shape, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coordinate), pl)
            assert tuple(b - a for a, b in mine) == tuple(local_shape)
            for (a, b), o in zip(mine, offset, strict=True):
                assert b == a or a == o
