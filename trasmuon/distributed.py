"""The optimizers under ``torch.distributed``: collectives between the step plan's stages
(see docs/distributed.md and docs/architecture.md).

Every class takes DTensor parameters as FSDP2 makes them (``Shard(0)`` on a 1-D mesh) and
runs the same stages as in one process, on each rank's rows. Three collectives join the
stages of a step:

* around ``orthogonalize``, per bucket of row-sharded matrices: an all-to-all sends every
  rank's rows of the Newton–Schulz input to the matrix's owner, which orthogonalizes whole
  matrices, and a second all-to-all sends each rank its rows of O;
* with ``process_group=`` (DDP work splitting, opt-in), per bucket of replicated matrices:
  each rank orthogonalizes a contiguous share of the bucket (balanced by Newton–Schulz FLOPs)
  and broadcasts it;
* between ``post`` and ``finish``: one all-reduce per step (per device, dtype and process
  group) of every sum over rows of every row-sharded matrix: column energies, ||O_base||_F^2,
  and whatever else a rule declares in ``MatrixRule.reductions``.

Before anything changes, with ``check_consistency`` (default) or ``check_finite``, one small
all-reduce agrees on which parameters have a gradient, whether every shard has the expected
rows and whether every gradient is finite, so that all ranks raise the same error instead of
hanging in a collective.

The plain classes are all there is: ``TrasMuon(model.parameters())`` after ``fully_shard``
works as ``torch.optim.AdamW`` does on FSDP2 params (the process group comes from the mesh).
``DistributedTrasMuon`` & co. are the same classes with ``process_group`` defaulting to the
world (work splitting on).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from .plan import Bucket, StepPlan, ceil_div, local, split_counts
from .rules import REGISTRY, get_rule
from .rules._matrix import eager_newton_schulz

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch 2.4
    from torch.distributed._tensor import DTensor, Shard

if TYPE_CHECKING:
    from .optimizer import MatrixOptimizer

__all__ = [
    "AGREEMENT_HEADER_BYTES",
    "CommStats",
    "DistributedAdamW",
    "DistributedMuon",
    "DistributedNorMuon",
    "DistributedTrasMuon",
    "distributed",
    "ns_flops",
    "shard_rows",
    "split_counts",
]

# Flags of the agreement all-reduce (MAX over ranks), one row per parameter, after a header
# (local validation failed; the hyperparameter digest and its complement).
_HAS_GRAD, _NO_GRAD, _NON_FINITE, _BAD_LAYOUT = range(4)
DIGEST_BYTES = 8
AGREEMENT_HEADER_BYTES = 1 + 2 * DIGEST_BYTES
# Group keys the digest leaves out: the params themselves, and what LR schedulers store
# (their own bookkeeping, never read by a rule).
_NOT_COMPARED = frozenset({"params", "param_names", "initial_lr", "max_lr", "min_lr", "base_lr",
                           "base_momentum", "max_momentum", "swa_lr"})


# --------------------------------------------------------------------------------------
# Planning helpers (identical on every rank, no communication)
# --------------------------------------------------------------------------------------
def ns_flops(shape: Sequence[int], steps: int) -> int:
    """Floating point operations of ``steps`` Newton-Schulz iterations on a (d_out, d_in)
    matrix: with s = min(d_out, d_in), l = max(d_out, d_in), one iteration is A = X X^T
    (2 s^2 l), A A (2 s^3) and B X (2 s^2 l), so ``steps * (4 s^2 l + 2 s^3)``."""
    small, large = sorted(int(d) for d in shape)
    return steps * (4 * small * small * large + 2 * small**3)


def shard_rows(d_out: int, world_size: int) -> list[tuple[int, int]]:
    """Row range [start, stop) of each rank for a ``Shard(0)`` layout: ``torch.chunk``
    semantics (ceil(d_out / world) rows per rank, the last ranks shorter or empty), which
    is what DTensor and FSDP2 use."""
    chunk = ceil_div(d_out, world_size)
    return [(min(r * chunk, d_out), min((r + 1) * chunk, d_out)) for r in range(world_size)]


@dataclasses.dataclass
class CommStats:
    """Collective calls of the last ``step`` on this rank, by operation: ``calls``, and the
    payload bytes this rank ``sent`` and ``received`` (a broadcast's buffer counts as sent by
    its source and received by every other rank; an all-reduce's tensor as both sent and
    received by every rank; an all-to-all's parts as sent and received, this rank's own part
    excluded). Payloads only: the algorithm's own traffic (e.g. a ring all-reduce moves
    about 2x its payload) is not counted."""

    calls: dict[str, int] = dataclasses.field(default_factory=dict)
    sent: dict[str, int] = dataclasses.field(default_factory=dict)
    received: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, op: str, sent: int, received: int) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        self.sent[op] = self.sent.get(op, 0) + sent
        self.received[op] = self.received.get(op, 0) + received

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def total_received(self) -> int:
        return sum(self.received.values())


# --------------------------------------------------------------------------------------
# Process groups
# --------------------------------------------------------------------------------------
def resolve_process_group(owner: str, process_group: Any, split_by_default: bool) -> Any:
    """The DDP work-splitting group: the one given, the world for the Distributed* classes,
    or None (no splitting)."""
    if process_group is None and not split_by_default:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{owner}: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first (or use the single-process class)")
    group = dist.group.WORLD if process_group is None else process_group
    if dist.get_rank(group) < 0:
        raise ValueError(f"{owner}: this rank is not a member of process_group")
    return group


def group_ref(group: Any) -> tuple[str | None, tuple[int, ...]] | None:
    """(name, global ranks) of a process group: enough to find it again in this process."""
    if group is None:
        return None
    if group is dist.group.WORLD:
        return ("WORLD", tuple(range(dist.get_world_size())))
    return (getattr(group, "group_name", None), tuple(dist.get_process_group_ranks(group)))


def resolve_group_ref(ref_: tuple[str | None, tuple[int, ...]] | None, owner: str) -> Any:
    """The process group ``group_ref`` described, or an error naming it (never another one)."""
    if ref_ is None:
        return None
    name, ranks = ref_
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{owner}: loading an optimizer that runs on process group {name!r} "
                           f"(ranks {list(ranks)}), but torch.distributed is not initialized")
    if name == "WORLD" and ranks == tuple(range(dist.get_world_size())):
        return dist.group.WORLD
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _resolve_process_group(name)
    except Exception:  # the name is unknown here (or this torch has no lookup by name)
        group = None
    if group is not None and tuple(dist.get_process_group_ranks(group)) == ranks:
        return group
    raise RuntimeError(
        f"{owner}: loading an optimizer that runs on process group {name!r} (ranks "
        f"{list(ranks)}), which does not exist in this process; create it (in the same "
        "order on every rank) before loading, or build a new optimizer with its process_group")


def _world(group: Any) -> int:
    return dist.get_world_size(group)


def _rank(group: Any) -> int:
    return dist.get_rank(group)


def _global_rank(group: Any, group_rank: int) -> int:
    if group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _comm_device(group: Any, fallback: torch.device) -> torch.device:
    backend = str(dist.get_backend(group))
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------
def is_row_sharded(p: Tensor) -> bool:
    return isinstance(p, DTensor) and p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),)


def mesh_group(p: DTensor) -> Any:
    return p.device_mesh.get_group()


def check_layout(opt: MatrixOptimizer, gi: int, pi: int, p: Tensor, rule: Any) -> None:
    """A DTensor of a matrix rule must be Shard(0) over a 1-D mesh (FSDP2's default), stored
    (out, in), over the ranks of ``process_group`` when one is given. Raised when the
    parameter is added and again before a step changes anything (the answer depends only on
    the global layout, so it is the same on every rank). AdamW takes any layout."""
    if not isinstance(p, DTensor) or not rule.matrix:
        return
    name = type(opt).__name__
    label = opt._label(gi, pi)
    if opt.param_groups[gi].get("orientation", "out_in") == "in_out":
        raise NotImplementedError(
            f"{name}: {label} is a DTensor stored (in, out) (orientation='in_out'); sharding "
            "its rows shards the matrix's input features, which the matrix rules do not "
            "support. Replicate it (DDP) or store it (out, in) like nn.Linear")
    mesh = p.device_mesh
    if not is_row_sharded(p):
        raise NotImplementedError(
            f"{name}: {label} is a DTensor with placements {tuple(p.placements)} on a "
            f"{mesh.ndim}-D mesh; rule {rule.name!r} supports DTensor parameters sharded on "
            "rows only (Shard(0) on a 1-D mesh, FSDP2's default). Use FSDP2's default "
            "sharding for this parameter, or put it on AdamW")
    if opt.process_group is not None:
        ranks = dist.get_process_group_ranks(opt.process_group)
        if mesh.mesh.flatten().tolist() != ranks:
            raise ValueError(
                f"{name}: {label} is sharded over ranks {mesh.mesh.flatten().tolist()}, but "
                f"the optimizer's process_group has ranks {ranks}; pass the mesh's group as "
                "process_group (or none)")


def describe_sharded(bucket: Bucket, p: DTensor) -> None:
    """Record the process group and this rank's rows of a row-sharded bucket."""
    group = mesh_group(p)
    bucket.process_group = group
    bucket.row_range = shard_rows(bucket.shape[0], _world(group))[_rank(group)]


def _comm_group(opt: MatrixOptimizer) -> Any:
    """The group the agreement all-reduce runs on: ``process_group``, or the mesh of the
    first row-sharded matrix."""
    if opt.process_group is not None:
        return opt.process_group
    for group in opt.param_groups:
        for p in group["params"]:
            # REGISTRY.get: an unknown rule set on a group later is validation's to report
            # (through the agreement), not a local error here.
            rule = REGISTRY.get(opt.rule_of(group, p))
            if isinstance(p, DTensor) and rule is not None and rule.matrix and is_row_sharded(p):
                return mesh_group(p)
    return None


# --------------------------------------------------------------------------------------
# Agreement before a step
# --------------------------------------------------------------------------------------
def needs_agreement(opt: MatrixOptimizer, plan: StepPlan | None = None) -> bool:
    """Whether this step starts with the agreement all-reduce (``plan``: the current plan,
    whose layout does not change while it is current, so its answer is kept there)."""
    if not (opt.check_consistency or opt.check_finite):
        return False
    if plan is not None and hasattr(plan, "comm_group"):
        group = plan.comm_group
    else:
        group = _comm_group(opt)
        if plan is not None:
            plan.comm_group = group
    return group is not None and _world(group) > 1


def hyperparameter_digest(opt: MatrixOptimizer, key: tuple | None = None) -> bytes:
    """8 bytes that differ (but for a hash collision) when two ranks' param groups differ:
    every group's rule, hyperparameters and float lr, and its parameters' global shapes. A
    tensor lr enters as "tensor": its value lives on the device, and reading it every step
    would sync the host. Hashed with blake2b (``hash()`` of a str differs between
    processes). ``key``: the step's plan fingerprint; everything but the lrs and the
    parameter counts is hashed again only when it changes (the fingerprint covers every
    other group key)."""
    cached = opt._static_digest
    if key is None or cached is None or cached[0] != key:
        static = hashlib.blake2b(repr(_group_descriptions(opt, with_lr=False)).encode()).digest()
        opt._static_digest = cached = (key, static)
    per_step = repr(tuple(("tensor" if isinstance(g["lr"], Tensor) else repr(g["lr"]),
                           len(g["params"])) for g in opt.param_groups))
    return hashlib.blake2b(cached[1] + per_step.encode(), digest_size=DIGEST_BYTES).digest()


def _group_descriptions(opt: MatrixOptimizer, with_lr: bool = True) -> list[tuple]:
    out = []
    for group in opt.param_groups:
        items = []
        for key in sorted(group):
            if key in _NOT_COMPARED or (key == "lr" and not with_lr):
                continue
            value = group[key]
            items.append((key, "tensor" if isinstance(value, Tensor) else repr(_canonical(value))))
        out.append((tuple(items), tuple(tuple(p.shape) for p in group["params"])))
    return out


def _canonical(value: Any) -> Any:
    """Lists as tuples: a checkpoint may bring back a group's tuples as lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(v) for v in value)
    return value


def agree(opt: MatrixOptimizer, work: list[tuple[int, int, Tensor, Tensor, str]] | None,
          error: Exception | None, key: tuple | None = None) -> None:
    """The agreement all-reduce (MAX, uint8) before a step changes anything. A header of
    ``AGREEMENT_HEADER_BYTES``: whether local validation failed on this rank (``error``),
    the hyperparameter digest and its complement (all ranks agree on a byte b exactly when
    max(b) + max(255 - b) == 255); then 4 flags per parameter: has a gradient, lacks one,
    has a non-finite gradient (with ``check_finite``), has a local shard that is not the
    ``Shard(0)`` chunk this module expects. Every rank raises the same error, naming the
    rank(s) it comes from; the gathers that name them run only on that error path."""
    name = type(opt).__name__
    group = _comm_group(opt)
    world, me = _world(group), _rank(group)
    labels, index = [], {}
    for gi, g in enumerate(opt.param_groups):
        for pi, p in enumerate(g["params"]):
            index[id(p)] = len(labels)
            labels.append((gi, pi))
    digest = hyperparameter_digest(opt, key)
    header = torch.tensor([error is not None, *digest, *(255 - b for b in digest)], dtype=torch.uint8)
    flags = torch.zeros(len(labels), 4, dtype=torch.uint8)
    flags[:, _NO_GRAD] = 1
    finite_rows, finite_flags = [], []
    fallback = torch.device("cpu")
    for _, _, p, grad, rule_name in work or ():
        i = index[id(p)]
        flags[i, _HAS_GRAD], flags[i, _NO_GRAD] = 1, 0
        lg = local(grad)
        fallback = lg.device
        if isinstance(p, DTensor) and get_rule(rule_name).matrix:
            start, stop = shard_rows(p.shape[0], world)[me]
            expected = (stop - start, p.shape[1])
            if (not isinstance(grad, DTensor) or tuple(grad.placements) != tuple(p.placements)
                    or tuple(p.to_local().shape) != expected or tuple(lg.shape) != expected):
                flags[i, _BAD_LAYOUT] = 1
        if opt.check_finite:
            finite_rows.append(i)
            finite_flags.append(~torch.isfinite(lg).all())
    device = _comm_device(group, fallback)
    message = torch.cat([header, flags.reshape(-1)]).to(device)
    if finite_rows:
        rows = torch.tensor(finite_rows, device=device)
        flat = message[AGREEMENT_HEADER_BYTES:].view(-1, 4)
        flat[rows, _NON_FINITE] = torch.stack([f.to(device) for f in finite_flags]).to(torch.uint8)
    dist.all_reduce(message, op=dist.ReduceOp.MAX, group=group)
    opt.comm_stats.add("all_reduce(agree)", message.numel(), message.numel())
    values = message.tolist()  # the host sync
    if values[0]:
        _raise_everywhere(opt, group, error)
    agreed = values[1:1 + DIGEST_BYTES]
    complement = values[1 + DIGEST_BYTES:AGREEMENT_HEADER_BYTES]
    if any(a + b != 255 for a, b in zip(agreed, complement, strict=True)):
        _raise_hyperparameter_mismatch(opt, group)
    rows = [values[i:i + 4] for i in range(AGREEMENT_HEADER_BYTES, len(values), 4)]
    culprit = next((i for i, r in enumerate(rows) if r[_HAS_GRAD] and r[_NO_GRAD]), None)
    if culprit is not None:
        raise RuntimeError(
            f"{name}: {opt._label(*labels[culprit])} has a gradient on some ranks of the "
            "process group and none on others; the optimizer state is replicated (or "
            "row-sharded), so every rank must have a gradient for it or none must (DDP "
            "with find_unused_parameters=True and FSDP2 guarantee this). The step was not "
            "taken and nothing was changed")
    culprit = next((i for i, r in enumerate(rows) if r[_BAD_LAYOUT]), None)
    if culprit is not None:
        raise RuntimeError(
            f"{name}: {opt._label(*labels[culprit])}: on some rank the local shard of the "
            "parameter or of its gradient is not the Shard(0) chunk that torch.chunk gives "
            "(or the gradient is not a DTensor with the parameter's placements). The step "
            "was not taken and nothing was changed")
    culprit = next((i for i, r in enumerate(rows) if r[_NON_FINITE]), None)
    if culprit is not None:
        raise RuntimeError(
            f"{name}: {opt._label(*labels[culprit])} has a non-finite gradient (NaN or Inf) "
            "on at least one rank; the step was not taken and no weight or optimizer state "
            "was changed")


def agree_on_error(opt: MatrixOptimizer, error: Exception | None) -> None:
    """Outside a step (``load_state_dict``): with the agreement on (``check_consistency`` or
    ``check_finite``) and more than one rank, one all-reduce of whether some rank's check
    failed; then every rank raises that rank's error. Otherwise ``error`` is raised here."""
    group = _comm_group(opt) if (opt.check_consistency or opt.check_finite) else None
    if group is None or _world(group) == 1:
        if error is not None:
            raise error
        return
    flag = torch.tensor([error is not None], dtype=torch.uint8,
                        device=_comm_device(group, torch.device("cpu")))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if flag.item():
        _raise_everywhere(opt, group, error)


_ERROR_TYPES: dict[str, type[Exception]] = {
    t.__name__: t for t in (ValueError, TypeError, RuntimeError, NotImplementedError)}


def _raise_everywhere(opt: MatrixOptimizer, group: Any, error: Exception | None) -> None:
    """Raise, on every rank, the error of the lowest rank whose local validation failed,
    with its type and message and the ranks it failed on."""
    world = _world(group)
    mine = None if error is None else (type(error).__name__, str(error))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    failed = [r for r, item in enumerate(gathered) if item is not None]
    kind, text = gathered[failed[0]]
    where = (f"rank {failed[0]}" if len(failed) == 1 else
             f"ranks {failed} (the message is rank {failed[0]}'s)")
    exc_type = _ERROR_TYPES.get(kind, RuntimeError)
    raised = exc_type(f"{text} [on {where} of the {world} in the process group; every rank "
                      "raises this error and none changed anything]")
    raise raised from error


def _raise_hyperparameter_mismatch(opt: MatrixOptimizer, group: Any) -> None:
    """Name the first group and key whose value differs between ranks (a gather of every
    rank's group descriptions, on this error path only)."""
    world = _world(group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, _group_descriptions(opt), group=group)
    name = type(opt).__name__
    detail = "the param groups differ"
    counts = [len(d) for d in gathered]
    if len(set(counts)) > 1:
        detail = f"the ranks have {counts} param groups"
    else:
        for gi in range(counts[0]):
            per_rank = [d[gi] for d in gathered]
            if len({repr(x) for x in per_rank}) == 1:
                continue
            keys = sorted({k for items, _ in per_rank for k, _ in items})
            for key in keys:
                values = [dict(items).get(key, "(missing)") for items, _ in per_rank]
                if len(set(values)) > 1:
                    shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                    detail = f"param group {gi} has {key} = {shown}"
                    break
            else:
                shapes = [shapes for _, shapes in per_rank]
                detail = f"param group {gi} has parameters of shapes {shapes} (by rank)"
            break
    raise ValueError(
        f"{name}: the hyperparameters differ across the ranks of the process group: {detail}. "
        "Every rank must build the optimizer with the same param groups and change them (lr "
        "schedules included) the same way; the step was not taken and nothing was changed")


# --------------------------------------------------------------------------------------
# Exchanges around Newton–Schulz
# --------------------------------------------------------------------------------------
def _tall(shape: tuple[int, int]) -> bool:
    return shape[0] > shape[1]


def _o_stack(count: int, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A (count, d_out, d_in) buffer in the layout of the eager Newton–Schulz output: a tall
    matrix's O is the transpose of a contiguous (d_in, d_out) tensor (``newton_schulz``
    iterates on X^T), so sums over its rows and columns round as in one process."""
    d_out, d_in = shape
    if _tall(shape):
        return torch.empty(count, d_in, d_out, dtype=dtype, device=device).mT
    return torch.empty(count, d_out, d_in, dtype=dtype, device=device)


class SplitExchange:
    """DDP work splitting for one bucket of replicated matrices: rank r orthogonalizes
    matrices [start_r, stop_r) and broadcasts them (one broadcast per rank with a share)."""

    def __init__(self, opt: MatrixOptimizer, bucket: Bucket, ranges: list[tuple[int, int]]) -> None:
        self.opt, self.bucket, self.ranges = opt, bucket, ranges
        self.group = opt.process_group
        self.me = _rank(self.group)
        b = bucket
        if b.backend == "triton":
            self.ortho = b.program.ortho_buffer()
            start, stop = ranges[self.me]
            self.own = b.program.ns_launches(start, stop) if stop > start else []
            self.row_sums = b.program.row_sumsq_launches()
        else:
            self.ortho = _o_stack(b.count, b.shape, b.group["ns_dtype"], b.device)
        self._works: list[Any] = []

    def start(self) -> None:
        b = self.bucket
        start, stop = self.ranges[self.me]
        if b.backend == "triton":
            for launch in self.own:
                launch()
        else:
            for i in range(start, stop):
                self.ortho[i].copy_(eager_newton_schulz(b, b.ns_input[i]))
        stats = self.opt.comm_stats
        for r, (s0, s1) in enumerate(self.ranges):
            if s1 == s0:
                continue
            part = self.ortho[s0:s1]
            buf = part.mT if _tall(b.shape) and b.backend != "triton" else part
            nbytes = buf.numel() * buf.element_size()
            stats.add("broadcast(O)", nbytes if r == self.me else 0, 0 if r == self.me else nbytes)
            self._works.append(dist.broadcast(buf, src=_global_rank(self.group, r),
                                              group=self.group, async_op=True))

    def finish(self) -> None:
        for work in self._works:
            work.wait()
        self._works = []
        b = self.bucket
        if b.backend == "triton":
            b.ortho = self.ortho
            for launch in self.row_sums:
                launch()
        else:
            b.ortho = [self.ortho[i] for i in range(b.count)]


class ShardedExchange:
    """One bucket of row-sharded matrices: an all-to-all of the Newton–Schulz input rows to
    each matrix's owner (a contiguous share of the bucket per rank), Newton–Schulz on whole
    matrices there, and an all-to-all of O's rows back."""

    def __init__(self, opt: MatrixOptimizer, bucket: Bucket, ranges: list[tuple[int, int]]) -> None:
        self.opt, self.bucket, self.ranges = opt, bucket, ranges
        b = bucket
        self.group = b.process_group
        self.world, self.me = _world(self.group), _rank(self.group)
        self.rows = shard_rows(b.shape[0], self.world)
        start, stop = ranges[self.me]
        self.own = stop - start
        d_out, d_in = b.shape
        self.dtype = b.group["ns_dtype"] if b.backend == "eager" else torch.bfloat16
        self.full_x = torch.empty(self.own, d_out, d_in, dtype=self.dtype, device=b.device)
        if b.backend == "triton":
            self.full_o = torch.empty(self.own, d_out, d_in, dtype=torch.bfloat16, device=b.device)
            self.ns = b.program.full_ns_launches(self.full_x, self.full_o) if self.own else []
            self.local_o = b.program.ortho_buffer()
            self.row_sums = b.program.row_sumsq_launches()
            # Allocated once: what the input rows arrive in, and O's rows in owner order.
            # O's rows come back straight into ``local_o``: the shares are contiguous and in
            # rank order, so the received blocks are its layout.
            self.recv_x = torch.empty(self.own * d_out * d_in, dtype=self.dtype, device=b.device)
            self.send_o = torch.empty(self.own * d_out * d_in, dtype=torch.bfloat16, device=b.device)

    def _part_rows(self, r: int) -> int:
        return self.rows[r][1] - self.rows[r][0]

    def _all_to_all(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int],
                    op: str) -> None:
        me = self.me
        sent = sum(s for r, s in enumerate(in_splits) if r != me) * inp.element_size()
        received = sum(s for r, s in enumerate(out_splits) if r != me) * out.element_size()
        self.opt.comm_stats.add(op, sent, received)
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)

    def run(self) -> None:
        b = self.bucket
        d_in = b.shape[1]
        me_rows = self._part_rows(self.me)
        # (1) Rows of the Newton–Schulz input (cast to its dtype: Newton–Schulz's own first
        # step) to every owner, in owner order (the shares are contiguous in the bucket).
        if b.backend == "triton":
            x_local = b.ns_input  # (B, local rows, d_in) bf16
        else:
            x_local = torch.stack([x.to(self.dtype) for x in b.ns_input]) if b.count else None
        send = x_local.reshape(-1)
        in_splits = [(s1 - s0) * me_rows * d_in for s0, s1 in self.ranges]
        out_splits = [self.own * self._part_rows(r) * d_in for r in range(self.world)]
        if b.backend == "triton":
            recv = self.recv_x
        else:
            recv = torch.empty(sum(out_splits), dtype=self.dtype, device=b.device)
        self._all_to_all(recv, send.contiguous(), out_splits, in_splits, "all_to_all(M)")
        offset = 0
        for r in range(self.world):
            n = out_splits[r]
            r0, r1 = self.rows[r]
            self.full_x[:, r0:r1].copy_(recv[offset:offset + n].view(self.own, r1 - r0, d_in))
            offset += n
        # (2) Newton–Schulz on whole matrices, (3) O's rows back.
        if b.backend == "triton":
            for launch in self.ns:
                launch()
            full_o = self.full_o
        else:
            full_o = _o_stack(self.own, b.shape, self.dtype, b.device)
            for i in range(self.own):
                full_o[i].copy_(eager_newton_schulz(b, self.full_x[i]))
        in_splits = [self.own * self._part_rows(r) * d_in for r in range(self.world)]
        out_splits = [(s1 - s0) * me_rows * d_in for s0, s1 in self.ranges]
        if b.backend == "triton":
            offset = 0
            for r, n in enumerate(in_splits):
                r0, r1 = self.rows[r]
                self.send_o[offset:offset + n].view(self.own, r1 - r0, d_in).copy_(full_o[:, r0:r1])
                offset += n
            self._all_to_all(self.local_o.view(-1), self.send_o, out_splits, in_splits, "all_to_all(O)")
            b.ortho = self.local_o
            for launch in self.row_sums:
                launch()
        else:
            tall = _tall(b.shape)
            parts = []
            for r in range(self.world):
                r0, r1 = self.rows[r]
                block = full_o[:, r0:r1]
                parts.append((block.mT if tall else block).contiguous().reshape(-1))
            send = torch.cat(parts) if parts else torch.empty(0, dtype=self.dtype, device=b.device)
            recv = torch.empty(sum(out_splits), dtype=self.dtype, device=b.device)
            self._all_to_all(recv, send, out_splits, in_splits, "all_to_all(O)")
            shape = (b.count, d_in, me_rows) if tall else (b.count, me_rows, d_in)
            stack = recv.view(shape)
            b.ortho = [stack[i].mT if tall else stack[i] for i in range(b.count)]


def plan_exchanges(opt: MatrixOptimizer, plan: StepPlan) -> None:
    """Attach an exchange to every bucket whose Newton–Schulz involves other ranks, with the
    shares of work balanced by Newton–Schulz FLOPs over the step's buckets."""
    loads: dict[tuple[int, ...], list[float]] = {}
    for b in plan.matrices:
        b.exchange = None
        if b.sharded:
            group = b.process_group
        elif opt.process_group is not None:
            group = opt.process_group
        else:
            continue
        world = _world(group)
        if world == 1:
            continue
        group_loads = loads.setdefault(tuple(dist.get_process_group_ranks(group)), [0.0] * world)
        ranges = split_counts(b.count, world, group_loads, ns_flops(b.shape, b.group["ns_steps"]))
        b.exchange = ShardedExchange(opt, b, ranges) if b.sharded else SplitExchange(opt, b, ranges)


def orthogonalize(opt: MatrixOptimizer, plan: StepPlan) -> None:
    """Newton–Schulz for every matrix bucket of the step: locally, or through its exchange."""
    split = []
    for b in plan.matrices:
        exchange = getattr(b, "exchange", None)
        if exchange is None:
            b.program.orthogonalize()
        elif isinstance(exchange, SplitExchange):
            exchange.start()
            split.append(exchange)
        else:
            exchange.run()
    for exchange in split:
        exchange.finish()


def reduce_rows(opt: MatrixOptimizer, plan: StepPlan) -> None:
    """One all-reduce per (device, dtype, process group) of the step's sums over rows of
    row-sharded matrices."""
    for group, buf in plan.sharded_reductions():
        if _world(group) == 1 or buf.numel() == 0:
            continue
        dist.all_reduce(buf, group=group)
        nbytes = buf.numel() * buf.element_size()
        opt.comm_stats.add("all_reduce(rows)", nbytes, nbytes)


# --------------------------------------------------------------------------------------
# Classes with work splitting on by default
# --------------------------------------------------------------------------------------
_CLASSES: dict[type, type] = {}


def distributed(cls: type) -> type:
    """``cls`` with ``process_group`` defaulting to the world (DDP work splitting):
    ``distributed(TrasMuon)(params, lr=..., process_group=None, check_consistency=True)``.
    The same class object is returned for the same ``cls``."""
    from .optimizer import MatrixOptimizer

    if not (isinstance(cls, type) and issubclass(cls, MatrixOptimizer)):
        raise TypeError(f"distributed() needs a MatrixOptimizer subclass, got {cls!r}")
    if cls.split_by_default:
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(
            f"Distributed{cls.__name__}", (cls,),
            {"__module__": __name__, "split_by_default": True,
             "__doc__": f"{cls.__name__} with ``process_group`` defaulting to the world: each "
                        "rank orthogonalizes a share of the replicated matrices (DDP)."},
        )
    return _CLASSES[cls]


def _classes() -> tuple[type, type, type, type]:
    from .optimizer import AdamW, Muon, NorMuon, TrasMuon

    return tuple(distributed(c) for c in (TrasMuon, NorMuon, Muon, AdamW))


DistributedTrasMuon, DistributedNorMuon, DistributedMuon, DistributedAdamW = _classes()
