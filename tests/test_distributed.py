"""trasmuon.distributed under DDP and FSDP2, on CPU with gloo, against the single-process run.

Each distributed test starts 1-3 worker processes (forkserver, so torch is imported once)
that train the same small model with the distributed optimizer and, in the same process, a
single-process optimizer on an unsharded copy of the model that is fed exactly the gradients
the distributed run used (DDP's averaged grads; the full FSDP2 grads). The two are compared
after every step:

* DDP: bitwise equal weights and state, for bf16, fp32 and fp64 Newton-Schulz (each matrix's
  NS runs once, on its owner, on the same input as in a single process; everything else is
  computed on every rank from identical inputs).
* FSDP2: bitwise equal momentum, row second moment and AdamW moments; weights and the
  per-column gate state equal within ``FSDP_RTOL``/``FSDP_ATOL``: the column energies and
  ||O_base||_F^2 are sums over rows, computed as per-shard partial sums and an all-reduce,
  which rounds differently from one sum over all rows (see docs/distributed.md).

A worker failure re-raises here with the worker's traceback; a hang fails the test after
``TIMEOUT`` seconds instead of blocking CI.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from trasmuon import Muon, NorMuon, TrasMuon, reference
from trasmuon.distributed import (
    AGREEMENT_HEADER_BYTES,
    CommStats,
    ns_flops,
    shard_rows,
    split_counts,
)
from trasmuon.splitting import DistributedMuon, DistributedNorMuon, DistributedTrasMuon, distributed

TIMEOUT = 150.0  # seconds per multi-process test (the machine may be shared and slow)
STEPS, CHECKPOINT_AT = 8, 5
FSDP_RTOL, FSDP_ATOL = 1e-5, 1e-7
HP = dict(lr=0.02, weight_decay=0.1, warmup_steps=2, clip_period=2, diagnostics=True)

# Workers are forked from a server that has imported these once (a spawned worker would
# import torch again: seconds per process on a 2-core machine).
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "trasmuon.distributed"])


# --------------------------------------------------------------------------------------
# The model, its param groups and one training step
# --------------------------------------------------------------------------------------
class Net(nn.Module):
    """Matrices of several shapes: 7 rows (uneven on 2 and 3 ranks), 2 rows (an empty shard
    on 3 ranks), tall and wide; ``side`` is unused on some steps. ``extra`` is not used by
    the forward pass: its gradient is set by hand, the same on every rank, and FSDP2 leaves
    it unsharded (a replicated matrix in the same step as sharded ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 16)
        self.side = nn.Linear(16, 16, bias=False)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 24, bias=False)
        self.fc3 = nn.Linear(24, 7, bias=False)
        self.proj = nn.Linear(7, 12, bias=False)
        self.tiny = nn.Linear(12, 2, bias=False)
        self.head = nn.Linear(2, 13)
        self.extra = nn.Parameter(torch.randn(6, 10))

    def forward(self, idx: torch.Tensor, use_side: bool) -> torch.Tensor:
        h = self.emb(idx).mean(1)
        if use_side:
            h = h + self.side(h)
        h = torch.relu(self.fc2(torch.relu(self.fc1(h))))
        return self.head(self.tiny(torch.tanh(self.proj(self.fc3(h)))))


MATRICES = ("fc1.weight", "fc2.weight", "fc3.weight", "tiny.weight", "extra")


def param_groups(model: nn.Module) -> list[dict]:
    """TrasMuon (bf16 NS), NorMuon (fp32 NS), Muon (fp64 NS, Nesterov) and AdamW groups."""
    named = dict(model.named_parameters())
    return [
        {"params": [named[k] for k in MATRICES]},
        {"params": [named["side.weight"]], "rule": "normuon", "ns_dtype": torch.float32},
        {"params": [named["proj.weight"]], "rule": "muon", "ns_dtype": torch.float64,
         "nesterov": True, "adjust_lr_fn": "match_rms_adamw"},
        {"params": [named[k] for k in ("emb.weight", "fc1.bias", "head.weight", "head.bias")],
         "rule": "adamw", "lr": 0.01, "weight_decay": 0.01},
    ]


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, 13, (4 * world, 5), generator=gen)
    target = torch.randint(0, 13, (4 * world,), generator=gen)
    return idx[rank::world], target[rank::world]


def side_used(step: int, rank: int, rank_local: bool) -> bool:
    """``side`` is unused by every rank on steps 3 and 6; with ``rank_local`` (DDP), it is
    used by rank 0 only on steps 2, 5 and 8 (DDP then still gives every rank its grad)."""
    if step % 3 == 0:
        return False
    return not (rank_local and step % 3 == 2 and rank != 0)


def burst_(step: int, local_grads: dict[str, torch.Tensor]) -> None:
    """Gradient bursts on a few columns from step 3 on (the column gate's target)."""
    if step >= 3:
        local_grads["fc2.weight"][:, [1, 5]] *= 20.0
        local_grads["fc1.weight"][:, 2] *= 30.0


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train_step(model, wrapped, opt, step, rank, world, rank_local, ref=None) -> None:
    """Forward/backward on this rank's batch, bursts, one step of ``opt``; with ``ref`` =
    (model, optimizer), one single-process step on the same (full) gradients."""
    idx, target = batch(step, rank, world)
    loss = nn.functional.cross_entropy(wrapped(idx, side_used(step, rank, rank_local)), target)
    loss.backward()
    named = dict(model.named_parameters())
    named["extra"].grad = torch.randn(6, 10, generator=torch.Generator().manual_seed(step))
    burst_(step, {k: local(p.grad) for k, p in named.items() if p.grad is not None})
    if step % 3 == 0:
        assert named["side.weight"].grad is None  # the step really has a param without grad
    if ref is not None:
        ref_model, ref_opt = ref
        for k, rp in ref_model.named_parameters():
            g = named[k].grad
            rp.grad = None if g is None else full(g).clone()
        ref_opt.step()
        ref_opt.zero_grad()
    opt.step()
    opt.zero_grad()


def state_pairs(opt, model, ref_opt, ref_model):
    """(name, key, distributed value, reference value) for every state entry and weight."""
    ref_named = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        rp = ref_named[name]
        yield name, "param", p.detach(), rp.detach()
        st, rst = opt.state[p], ref_opt.state[rp]
        assert set(st) == set(rst), (name, set(st), set(rst))
        for key in st:
            yield name, key, st[key], rst[key]


def assert_same_on_all_ranks(t: torch.Tensor, what: str) -> None:
    t = t.detach().contiguous()
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    for r, g in enumerate(gathered):
        assert torch.equal(g, gathered[0]), f"{what} differs between rank 0 and rank {r}"


def gather_stats(opt) -> list[dict]:
    stats = [None] * dist.get_world_size()
    dist.all_gather_object(stats, {"calls": opt.comm_stats.calls, "sent": opt.comm_stats.sent,
                                   "received": opt.comm_stats.received})
    return stats


def _padded(n: int) -> int:
    return -(-n // 16) * 16


def expected_bytes(opt, world: int) -> dict[str, int]:
    """The payload formulas of docs/distributed.md for the last step, summed over ranks: each
    exchanged bucket's matrices split into contiguous shares by ``split_counts`` (balanced by
    Newton-Schulz FLOPs over the buckets); an owner receives every block it does not hold
    once, and sends every other holder its block of O (with the rows' float sums of squares
    for TrasMuon and NorMuon), each piece padded to 16 bytes; the sums over rows of sharded
    matrices are all-reduced whole."""
    out = {"all_to_all(X)": 0, "all_to_all(O)": 0, "row_reduce": 0}
    loads: list[float] = [0.0] * world
    for b in opt._plan.matrices:
        if b.exchange is None:
            continue
        ranges = split_counts(b.count, world, loads, ns_flops(b.shape, b.group["ns_steps"]))
        itemsize = (torch.bfloat16 if b.backend == "triton" else b.group["ns_dtype"]).itemsize
        sums_size = (4 if b.backend == "triton" else b.state_dtype.itemsize) if b.rule.needs_row_sumsq else 0
        blocks = b.layout.blocks
        for owner, (s0, s1) in enumerate(ranges):
            distinct = {blk for r, blk in enumerate(blocks) if blk.numel and blk != blocks[owner]}
            per_matrix_x = sum(_padded(blk.numel * itemsize) for blk in distinct)
            per_matrix_o = 0
            for r, blk in enumerate(blocks):
                if r != owner and (blk.numel or (sums_size and blk.shape[0])):
                    n = blk.numel * itemsize
                    per_matrix_o += _padded(_padded(n) + blk.shape[0] * sums_size if sums_size else n)
            out["all_to_all(X)"] += (s1 - s0) * per_matrix_x
            out["all_to_all(O)"] += (s1 - s0) * per_matrix_o
        if b.sharded:
            sums = b.rule.reductions(b.group, b.shape)
            out["row_reduce"] += b.count * sum(sums.values()) * b.state_dtype.itemsize
    return out


def check_bytes(stats: list[dict], expected: dict[str, int], agree_bytes: int) -> None:
    """The measured payloads (CommStats of every rank) against ``expected_bytes``."""
    sent = [s["sent"] for s in stats]
    received = [s["received"] for s in stats]
    for s in stats:
        assert s["sent"].get("all_reduce(agree)", 0) == agree_bytes
        assert s["sent"].get("all_reduce(rows)", 0) == expected["row_reduce"]
    for op in ("all_to_all(X)", "all_to_all(O)"):
        total = sum(x.get(op, 0) for x in sent)
        assert total == sum(x.get(op, 0) for x in received) == expected[op], (op, total, expected[op])


# --------------------------------------------------------------------------------------
# Worker plumbing
# --------------------------------------------------------------------------------------
def _entry(rank: int, fn, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=rank, world_size=world
    )
    try:
        fn(rank, world, tmp)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_workers(fn, world: int, tmp_path, timeout: float = TIMEOUT) -> None:
    ctx = mp.start_processes(
        _entry, args=(fn, world, str(tmp_path)), nprocs=world, join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail(f"{fn.__name__} on {world} ranks did not finish in {timeout:.0f} s")


def write_report(tmp: str, report: dict) -> None:
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f)


def read_report(tmp_path) -> dict:
    with open(tmp_path / "report.json") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    check = world != 3  # 3 ranks: no agreement all-reduce, no host sync

    def build(seed):
        torch.manual_seed(seed)
        model = Net()
        wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        return model, wrapped, DistributedTrasMuon(param_groups(model), **HP, check_consistency=check)

    model, wrapped, opt = build(0)
    torch.manual_seed(0)
    ref_model = Net()
    ref_opt = TrasMuon(param_groups(ref_model), **HP)
    n_params = len(list(model.parameters()))
    stats = []
    ckpt = os.path.join(tmp, "ddp.pt")
    for step in range(1, STEPS + 1):
        train_step(model, wrapped, opt, step, rank, world, True, (ref_model, ref_opt))
        for name, key, value, ref_value in state_pairs(opt, model, ref_opt, ref_model):
            assert torch.equal(value, ref_value), f"step {step}: {name} {key} differs"
        assert opt.diagnostics() == ref_opt.diagnostics()
        stats.append(gather_stats(opt))
        if world > 1:
            check_bytes(stats[-1], expected_bytes(opt, world),
                        (4 * n_params + AGREEMENT_HEADER_BYTES) * check)
        if step == CHECKPOINT_AT:
            if rank == 0:  # any rank's state is complete: save one
                torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, ckpt)
            dist.barrier()
    assert ref_opt.state[ref_model.fc2.weight]["c_ema"].min() < 0.99  # the gate did engage
    for name, key, value, _ in state_pairs(opt, model, ref_opt, ref_model):
        assert_same_on_all_ranks(value, f"{name} {key}")

    # Resume from rank 0's checkpoint on every rank: bitwise the uninterrupted run.
    model2, wrapped2, opt2 = build(1)
    saved = torch.load(ckpt)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optim"])
    for step in range(CHECKPOINT_AT + 1, STEPS + 1):
        train_step(model2, wrapped2, opt2, step, rank, world, True)
    for name, key, value, ref_value in state_pairs(opt2, model2, opt, model):
        assert torch.equal(value, ref_value), f"resumed: {name} {key} differs"

    # A parameter with a gradient on one rank only: the same error on every rank, no hang,
    # nothing changed.
    if world > 1 and check:
        before = [p.clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.ones_like(p) if (rank == 0 or p is not model.fc2.weight) else None
        with pytest.raises(RuntimeError, match="gradient on some ranks"):
            opt.step()
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))

    # The other distributed classes, with their own defaults (2D params on their matrix
    # rule, the rest on AdamW): bitwise their single-process class.
    for dist_cls, cls in ((DistributedMuon, Muon), (DistributedNorMuon, NorMuon)):
        torch.manual_seed(2)
        model3 = Net()
        wrapped3 = nn.parallel.DistributedDataParallel(model3, find_unused_parameters=True)
        ref3 = copy.deepcopy(model3)
        opt3, ref_opt3 = dist_cls(model3.parameters(), lr=0.01), cls(ref3.parameters(), lr=0.01)
        for step in range(1, 4):
            train_step(model3, wrapped3, opt3, step, rank, world, True, (ref3, ref_opt3))
        for name, key, value, ref_value in state_pairs(opt3, model3, ref_opt3, ref3):
            assert torch.equal(value, ref_value), f"{dist_cls.__name__}: {name} {key} differs"
    write_report(tmp, {"stats": stats})


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ddp_matches_single_process(world, tmp_path):
    """DDP (find_unused_parameters) with TrasMuon/NorMuon/Muon/AdamW groups, weight decay,
    warmup, gradient bursts, a param unused by one rank and by all ranks: bitwise equal to
    the single-process optimizer on the same grads, identical on all ranks, checkpoint
    resume bitwise, rank-dependent gradient sets raise on every rank."""
    run_workers(_ddp_worker, world, tmp_path)
    if world > 1:
        stats = read_report(tmp_path)["stats"]
        print(f"\nDDP {world} ranks, step 1 payload bytes per rank:", stats[0])


# --------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------
def _fully_shard(model: nn.Module, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    for name in ("side", "fc1", "fc2", "fc3", "proj", "tiny"):
        fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params={model.extra})
    return model


def _dcp_save(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)


def _dcp_load(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])


BITWISE_KEYS = ("momentum", "exp_avg", "exp_avg_sq", "step")


def _fsdp_worker(rank: int, world: int, tmp: str) -> None:
    from torch.distributed.tensor import DTensor

    def build(seed):
        torch.manual_seed(seed)
        model = _fully_shard(Net(), world)
        return model, DistributedTrasMuon(param_groups(model), **HP, check_finite=True)

    torch.manual_seed(0)
    ref_model = Net()
    ref_opt = TrasMuon(param_groups(ref_model), **HP)
    model, opt = build(0)
    assert isinstance(model.fc3.weight, DTensor)
    n_params = len(list(model.parameters()))
    stats, worst = [], {"abs": 0.0, "rel": 0.0}
    ckpt = os.path.join(tmp, "dcp")
    for step in range(1, STEPS + 1):
        train_step(model, model, opt, step, rank, world, False, (ref_model, ref_opt))
        for name, key, value, ref_value in state_pairs(opt, model, ref_opt, ref_model):
            value = full(value)
            if key in BITWISE_KEYS:
                assert torch.equal(value, ref_value), f"step {step}: {name} {key} differs"
            else:
                torch.testing.assert_close(value, ref_value, rtol=FSDP_RTOL, atol=FSDP_ATOL,
                                           msg=lambda m, n=name, k=key, t=step: f"step {t}: {n} {k}: {m}")
                err = float((value - ref_value).abs().max())
                worst["abs"] = max(worst["abs"], err)
                worst["rel"] = max(worst["rel"], err / max(float(ref_value.abs().max()), 1e-30))
            if not isinstance(opt.state[model.get_parameter(name)].get(key), DTensor):
                assert_same_on_all_ranks(value, f"{name} {key}")  # replicated state
        diag, ref_diag = opt.diagnostics(), ref_opt.diagnostics()
        assert diag.keys() == ref_diag.keys()
        for label, values in diag.items():
            for key, value in values.items():
                assert value == pytest.approx(ref_diag[label][key], rel=FSDP_RTOL, abs=FSDP_ATOL)
        stats.append(gather_stats(opt))
        if world > 1:  # one rank: no collective at all
            check_bytes(stats[-1], expected_bytes(opt, world), 4 * n_params + AGREEMENT_HEADER_BYTES)
        else:
            assert stats[-1][0]["calls"] == {}
        if step == CHECKPOINT_AT:
            _dcp_save(model, opt, ckpt)
    assert ref_opt.state[ref_model.fc2.weight]["c_ema"].min() < 0.99  # the gate did engage

    # Newton-Schulz itself: every rank's rows of O (of the last step) are bitwise the rows of
    # the single-process O of the same input, for bf16 and fp32 Newton-Schulz, sharded and
    # replicated matrices (the Muon group's input is a Nesterov blend: not checked here).
    for b in opt._plan.matrices:
        if b.group["nesterov"]:
            continue
        schedule = reference.ns_schedule(b.group["ns_coefficients"], b.group["ns_steps"])
        for p, ortho in zip(b.params, b.ortho, strict=True):
            m = full(opt.state[p]["momentum"])
            want = reference.newton_schulz(m, schedule, b.group["eps"], b.group["ns_dtype"])
            start, stop = shard_rows(p.shape[0], world)[rank] if hasattr(p, "to_local") else (0, None)
            assert ortho.dtype == want.dtype and torch.equal(ortho, want[start:stop]), tuple(p.shape)
    st = opt.state[model.fc3.weight]
    assert isinstance(st["momentum"], DTensor) and isinstance(st["row_v"], DTensor)
    assert st["row_v"].to_local().shape[0] == model.fc3.weight.to_local().shape[0]

    # DCP round trip: a fresh model and optimizer resume bitwise.
    model2, opt2 = build(1)
    _dcp_load(model2, opt2, ckpt)
    for step in range(CHECKPOINT_AT + 1, STEPS + 1):
        train_step(model2, model2, opt2, step, rank, world, False)
    for name, key, value, other in state_pairs(opt2, model2, opt, model):
        assert type(value) is type(other), (name, key)
        assert torch.equal(full(value), full(other)), f"resumed: {name} {key} differs"

    # A non-finite gradient in one rank's shard stops every rank before anything changes.
    before = [full(p).clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if rank == world - 1:
        local(model.fc1.weight.grad)[-1, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step()
    # A gradient missing on one rank only: the same error everywhere.
    model.fc1.weight.grad = torch.zeros_like(model.fc1.weight)
    if world > 1:
        if rank == 0:
            model.fc2.weight.grad = None
        with pytest.raises(RuntimeError, match="gradient on some ranks"):
            opt.step()
    assert all(torch.equal(a, full(p)) for a, p in zip(before, model.parameters(), strict=True))

    # A Partial DTensor (a pending sum, not a layout of the matrix): a clear error at
    # construction; elementwise rules take it.
    from torch.distributed.tensor import Partial

    mesh = model.fc1.weight.device_mesh
    p = nn.Parameter(DTensor.from_local(torch.randn(6, 8), mesh, [Partial()], run_check=False))
    with pytest.raises(NotImplementedError, match="Partial"):
        DistributedNorMuon([p])
    DistributedTrasMuon([{"params": [p], "rule": "adamw"}])
    write_report(tmp, {"stats": stats, "worst": worst})


@pytest.mark.parametrize("world", [1, 2, 3])
def test_fsdp2_matches_single_process(world, tmp_path):
    """FSDP2 (DTensor Shard(0), uneven and empty shards) with the same groups and events as
    the DDP test: momentum and row moments bitwise, weights and gate state within tolerance,
    replicated state identical on all ranks, DCP save/load resume bitwise, non-finite and
    rank-dependent gradients raise on every rank, unsupported placements raise."""
    run_workers(_fsdp_worker, world, tmp_path)
    report = read_report(tmp_path)
    print(f"\nFSDP2 {world} ranks, step 1 payload bytes per rank:", report["stats"][0])
    print("largest |error| (abs, relative to the tensor's max |value|):", report["worst"])


# --------------------------------------------------------------------------------------
# Planning and API, in this process
# --------------------------------------------------------------------------------------
def test_ns_flops():
    assert ns_flops((8, 8), 5) == 5 * (4 * 8**3 + 2 * 8**3)
    assert ns_flops((32, 4), 1) == ns_flops((4, 32), 1) == 4 * 16 * 32 + 2 * 64


def test_split_counts_balances_flops_in_contiguous_shares():
    big, small = ns_flops((512, 512), 5), ns_flops((64, 64), 5)
    loads = [0.0, 0.0]
    assert split_counts(1, 2, loads, big) == [(0, 1), (1, 1)]  # the big matrix alone on rank 0
    assert split_counts(8, 2, loads, small) == [(0, 4), (4, 8)]
    assert split_counts(3, 2, loads, small) == [(0, 1), (1, 3)]  # the extra one to rank 1
    assert loads == [big + 5 * small, 6 * small]
    assert split_counts(0, 3, [0.0] * 3, 1.0) == [(0, 0)] * 3
    assert split_counts(2, 4, [0.0] * 4, 1.0) == [(0, 1), (1, 2), (2, 2), (2, 2)]


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 7, 12])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_rows_is_torch_chunk(rows, world):
    chunks = [c.numel() for c in torch.arange(rows).chunk(world)]
    chunks += [0] * (world - len(chunks))
    assert [b - a for a, b in shard_rows(rows, world)] == chunks


def test_api_without_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialized"):
        DistributedTrasMuon([nn.Parameter(torch.randn(4, 4))])
    assert distributed(TrasMuon) is DistributedTrasMuon
    assert distributed(DistributedMuon) is DistributedMuon
    sub = type("MyMuon", (TrasMuon,), {})
    assert distributed(sub) is distributed(sub) and distributed(sub).split_by_default
    with pytest.raises(TypeError):
        distributed(torch.optim.AdamW)
    stats = CommStats()
    stats.add("x", 3, 4)
    stats.add("x", 1, 0)
    assert (stats.calls, stats.total_sent, stats.total_received) == ({"x": 2}, 4, 4)



# --------------------------------------------------------------------------------------
# Agreement: one rank's bad input is every rank's error
# --------------------------------------------------------------------------------------
def _snapshot(model: nn.Module, opt) -> list[torch.Tensor]:
    out = [local(p).detach().clone() for p in model.parameters()]
    for state in opt.state.values():
        out += [local(v).detach().clone() for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def _unchanged(before: list[torch.Tensor], model: nn.Module, opt) -> bool:
    after = _snapshot(model, opt)
    return len(before) == len(after) and all(
        torch.equal(a, b) for a, b in zip(before, after, strict=True))


def _agreement_worker(rank: int, world: int, tmp: str) -> None:
    """Rank-local faults, each on one rank only: every rank raises the same error naming the
    faulty rank, nothing changes on any rank, and the next good step runs on all."""
    torch.manual_seed(0)
    model = Net()

    def grads(step: int) -> None:
        gen = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)

    def refused(opt, exc_type, pattern, fault) -> None:
        grads(99)
        before = _snapshot(model, opt)
        undo = fault()
        with pytest.raises(exc_type, match=pattern):
            opt.step()
        assert _unchanged(before, model, opt)
        if undo is not None:
            undo()
        grads(100)
        opt.step()  # the ranks are still together

    def on(r, fn):
        return (lambda: fn()) if rank == r else (lambda: None)

    # Hyperparameters that differ: at construction, and later (a schedule on one rank).
    opt = DistributedTrasMuon(param_groups(model), lr=1e-3 * (1 + rank))
    with pytest.raises(ValueError, match=r"param group 0 has lr = rank 0: 0\.001, rank 1: 0\.002"):
        grads(1)
        opt.step()
    opt = DistributedTrasMuon(param_groups(model), lr=1e-3, ns_steps=5 - 2 * rank)
    with pytest.raises(ValueError, match="param group 0 has ns_steps = rank 0: 5, rank 1: 3"):
        opt.step()
    opt = DistributedTrasMuon(param_groups(model), lr=1e-3)
    grads(2)
    opt.step()
    group = opt.param_groups[3]

    def set_lr(value):
        old = group["lr"]
        group["lr"] = value
        return lambda: group.__setitem__("lr", old)

    refused(opt, ValueError, "param group 3 has lr", on(1, lambda: set_lr(0.5)))
    # Local validation errors, raised on every rank with the faulty rank's message.
    refused(opt, ValueError, r"lr must be a finite float >= 0.*\[on rank 0 of the 2",
            on(0, lambda: set_lr(-1.0)))
    refused(opt, ValueError, r"lr: a tensor lr must be finite and >= 0.*\[on rank 1",
            on(1, lambda: set_lr(torch.tensor(-1.0))))

    def sparse_grad():
        model.emb.weight.grad = model.emb.weight.grad.to_sparse()

    refused(opt, RuntimeError, r"'?parameter.*sparse.*\[on rank 1", on(1, sparse_grad))

    def short_grad():
        model.fc2.weight.grad.data = torch.randn(12, 32)

    refused(opt, RuntimeError, r"gradient must match its parameter.*\[on rank 0", on(0, short_grad))

    # load_state_dict: state that one rank's checkpoint shard spoils.
    state = opt.state_dict()
    if rank == 1:
        state = copy.deepcopy(state)
        first = next(iter(state["state"].values()))
        first["momentum" if "momentum" in first else "exp_avg"].view(-1)[0] = float("nan")
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"holds NaN or Inf.*\[on rank 1"):
        opt.load_state_dict(state)
    assert _unchanged(before, model, opt)
    grads(3)
    opt.step()

    # FSDP2: the plain class, whose agreement runs on the mesh's group.
    torch.manual_seed(0)
    model = _fully_shard(Net(), world)
    opt = TrasMuon(model.parameters(), lr=0.02)
    train_step(model, model, opt, 1, rank, world, False)
    opt.zero_grad()
    idx, target = batch(2, rank, world)
    nn.functional.cross_entropy(model(idx, True), target).backward()
    model.extra.grad = torch.ones(6, 10)
    before = _snapshot(model, opt)
    group = opt.param_groups[0]
    if rank == 1:
        group["weight_decay"] = -0.5
    with pytest.raises(ValueError, match=r"weight_decay must be a finite float >= 0.*\[on rank 1"):
        opt.step()
    assert _unchanged(before, model, opt)
    group["weight_decay"] = 0.0 if rank == 1 else 0.5
    with pytest.raises(ValueError, match=r"weight_decay = rank 0: 0\.5, rank 1: 0\.0"):
        opt.step()
    assert _unchanged(before, model, opt)


def test_one_ranks_fault_is_every_ranks_error(tmp_path):
    run_workers(_agreement_worker, 2, tmp_path)


# --------------------------------------------------------------------------------------
# Options survive a resume
# --------------------------------------------------------------------------------------
def _own_group_worker(rank: int, world: int, tmp: str) -> None:
    """Each rank trains its own model in its own one-rank process group: after
    load_state_dict, deepcopy and pickling the optimizer still uses that group (and its
    check_consistency), so its weights keep equalling a single-process run bitwise."""
    import io

    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    mine = groups[rank]
    torch.manual_seed(10 + rank)  # a different model on each rank
    model = Net()
    ref_model = copy.deepcopy(model)
    opt = DistributedTrasMuon(param_groups(model), **HP, process_group=mine,
                              check_consistency=False)
    ref_opt = TrasMuon(param_groups(ref_model), **HP)
    for step in range(1, STEPS + 1):
        if step == 3:
            opt.load_state_dict(opt.state_dict())
        assert opt.process_group is mine and opt.check_consistency is False, step
        train_step(model, model, opt, step, 0, 1, False, (ref_model, ref_opt))
        for name, key, value, ref_value in state_pairs(opt, model, ref_opt, ref_model):
            assert torch.equal(value, ref_value), f"step {step}: {name} {key} differs"
    copied = copy.deepcopy(opt)
    assert copied.process_group is mine and copied.check_consistency is False
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.process_group is mine and loaded.check_consistency is False
    assert (loaded.backend, loaded.diagnostics_enabled) == (opt.backend, True)


def test_process_group_and_options_survive_resume(tmp_path):
    run_workers(_own_group_worker, 2, tmp_path)


def test_pickled_optimizer_needs_its_process_group():
    from trasmuon.distributed import resolve_group_ref

    with pytest.raises(RuntimeError, match="not initialized"):
        resolve_group_ref(("group7", (0, 1)), "DistributedTrasMuon")


# --------------------------------------------------------------------------------------
# The plain classes on FSDP2 params
# --------------------------------------------------------------------------------------
def _plain_fsdp_worker(rank: int, world: int, tmp: str) -> None:
    """``TrasMuon(model.parameters())`` after ``fully_shard`` (no distributed class, no
    process_group): every 2D param on the matrix rule, sharded ones included, the rest on
    AdamW; float64 Newton-Schulz, so the only difference from one process is the order of
    the sums over rows."""
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    ref_model = Net()
    model = _fully_shard(copy.deepcopy(ref_model), world)
    kw = dict(lr=0.02, weight_decay=0.1, warmup_steps=2, clip_period=2, ns_dtype=torch.float64)
    opt = TrasMuon(model.parameters(), **kw)
    ref_opt = TrasMuon(ref_model.parameters(), **kw)
    assert opt.process_group is None and isinstance(model.fc1.weight, DTensor)
    worst = 0.0
    for step in range(1, STEPS + 1):
        train_step(model, model, opt, step, rank, world, False, (ref_model, ref_opt))
        for (name, p), rp in zip(model.named_parameters(), ref_model.parameters(), strict=True):
            got, want = full(p).detach(), rp.detach()
            rel = float((got - want).norm() / want.norm())
            worst = max(worst, rel)
            assert rel < 1e-5, (step, name, rel)
    assert opt.comm_stats.calls.get("all_reduce(rows)", 0) == (1 if world > 1 else 0)
    # NAMO-D the same way: its column sums of G and of N are all-reduced with the step's others.
    from trasmuon import NAMOD

    torch.manual_seed(0)
    ref_model = Net()
    model = _fully_shard(copy.deepcopy(ref_model), world)
    kw = dict(lr=0.02, weight_decay=0.1, ns_dtype=torch.float64, clamp=0.5)
    opt, ref_opt = NAMOD(model.parameters(), **kw), NAMOD(ref_model.parameters(), **kw)
    for step in range(1, 5):
        train_step(model, model, opt, step, rank, world, False, (ref_model, ref_opt))
        for p, rp in zip(model.parameters(), ref_model.parameters(), strict=True):
            rel = float((full(p).detach() - rp.detach()).norm() / rp.detach().norm())
            worst = max(worst, rel)
            assert rel < 1e-5, (step, rel)
    write_report(tmp, {"worst": worst})


@pytest.mark.parametrize("world", [2, 3])
def test_plain_class_on_fsdp2_params_equals_one_process(world, tmp_path):
    run_workers(_plain_fsdp_worker, world, tmp_path)
    print(f"\nplain TrasMuon on FSDP2, {world} ranks: worst relative weight difference",
          read_report(tmp_path)["worst"])


# --------------------------------------------------------------------------------------
# The Triton backend under torch.distributed (in the interpreter on the CPU)
# --------------------------------------------------------------------------------------
TRITON_HP = dict(lr=0.02, weight_decay=0.1, warmup_steps=2, clip_period=2, ns_steps=3,
                 backend="triton")
NAMO_KEYS = ("grad_sq_avg", "col_grad_sq_avg")


def triton_groups(model: nn.Module) -> list[dict]:
    """TrasMuon, NorMuon, Muon, NAMO and NAMO-D groups, all with bf16 Newton-Schulz (what the
    kernels take), and AdamW for the rest."""
    named = dict(model.named_parameters())
    return [
        {"params": [named[k] for k in ("fc1.weight", "fc2.weight", "extra")]},
        {"params": [named["side.weight"]], "rule": "normuon"},
        {"params": [named["proj.weight"]], "rule": "muon", "adjust_lr_fn": "match_rms_adamw"},
        {"params": [named["fc3.weight"]], "rule": "namo"},
        {"params": [named["tiny.weight"]], "rule": "namo_d", "clamp": 0.5},
        {"params": [named[k] for k in ("emb.weight", "fc1.bias", "head.weight", "head.bias")],
         "rule": "adamw", "lr": 0.01, "weight_decay": 0.01},
    ]


def _relative_to_moved(value, ref_value, start):
    moved = (ref_value - start).norm()
    return float((value - ref_value).norm() / moved) if moved > 0 else 0.0


def _triton_worker(rank: int, world: int, tmp: str) -> None:
    """DDP work splitting and FSDP2 on the Triton backend against the single-process Triton
    run on the same gradients: no matrix falls back to eager; the momenta and AdamW moments
    match bitwise (DDP) and the weights within bf16 noise (O's row sums are reduced by another
    kernel after an exchange; FSDP2's sums over rows are per-shard partial sums)."""
    report = {}
    for mode in ("ddp", "fsdp"):
        torch.manual_seed(0)
        ref_model = Net()
        start = {k: v.detach().clone() for k, v in ref_model.named_parameters()}
        if mode == "ddp":
            model = copy.deepcopy(ref_model)
            wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
            opt = DistributedTrasMuon(triton_groups(model), **TRITON_HP)
        else:
            model = wrapped = _fully_shard(copy.deepcopy(ref_model), world)
            opt = TrasMuon(triton_groups(model), **TRITON_HP)  # the plain class, DTensor params
        ref_opt = TrasMuon(triton_groups(ref_model), **TRITON_HP)
        worst: dict[str, float] = {}
        for step in range(1, 5):  # step 3: a param without a gradient (a new plan)
            train_step(model, wrapped, opt, step, rank, world, mode == "ddp", (ref_model, ref_opt))
            assert all(b.backend == "triton" for b in opt._plan.buckets), mode
            for name, key, value, ref_value in state_pairs(opt, model, ref_opt, ref_model):
                value = full(value)
                if key == "param":
                    rel = _relative_to_moved(value, ref_value, start[name])
                    worst[name] = max(worst.get(name, 0.0), rel)
                elif key in ("momentum", "exp_avg", "exp_avg_sq", "step") and mode == "ddp":
                    assert torch.equal(value, ref_value), (mode, step, name, key)
                elif key in NAMO_KEYS:  # the column sums of G, all-reduced over shards
                    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-7)
        assert max(worst.values()) < 5e-2, (mode, worst)
        report[mode] = {"worst": max(worst.values()), "stats": gather_stats(opt)[0]}
    write_report(tmp, report)


@pytest.mark.parametrize("world", [2, 3])
def test_triton_backend_under_ddp_and_fsdp2(world, tmp_path):
    run_workers(_triton_worker, world, tmp_path)
    report = read_report(tmp_path)
    for mode, values in report.items():
        print(f"\nTriton {mode}, {world} ranks: worst weight difference / distance moved "
              f"{values['worst']:.2e}; rank 0 collectives {values['stats']['calls']}")
