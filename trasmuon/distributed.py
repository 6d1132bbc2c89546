"""The optimizers under ``torch.distributed``: collectives between the step plan's stages
(see docs/distributed.md and docs/architecture.md).

Every class takes DTensor parameters on any layout of blocks (FSDP2, HSDP, tensor
parallelism, FSDP2 over TP: ``trasmuon.layout``) and runs the same stages as in one process,
on each rank's block of every matrix. Per step and process group:

* one all-reduce, the agreement (``check_consistency`` or ``check_finite``), before anything
  changes: every rank's validation verdict, a digest of the hyperparameters, and per
  parameter whether it has a gradient, a block of the expected shape and a finite gradient,
  so that all ranks raise the same error instead of hanging in a collective;
* one asynchronous all-to-all of the Newton–Schulz inputs' blocks to every matrix's owner,
  and one of O's blocks (with O's row sums of squares) back to every holder
  (:class:`StepExchange`); DDP work splitting (``process_group=``) is the same exchange with
  every rank holding every matrix;
* one all-reduce of every sum over rows of every sharded matrix (column energies,
  ||O_base||_F^2, and whatever else a rule declares in ``MatrixRule.reductions``).

The plain classes are all there is: ``TrasMuon(model.parameters())`` after ``fully_shard``
works as ``torch.optim.AdamW`` does on DTensor params. ``DistributedTrasMuon`` & co.
(trasmuon/splitting.py) are the same classes with ``process_group`` defaulting to the world
(DDP work splitting on).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import (
    ExchangeEntry,
    ExchangePlan,
    MatrixLayout,
    StackLayout,
    matrix_layout,
    replicated_layout,
    stack_layouts,
)
from .plan import Bucket, DTensor, StepPlan, ceil_div, local, split_counts
from .reference import newton_schulz_flops, ns_block_shape
from .rules import REGISTRY, get_rule
from .rules._matrix import gram_restarts, ns_blocks

if TYPE_CHECKING:
    from .optimizer import MatrixOptimizer

__all__ = [
    "AGREEMENT_HEADER_BYTES",
    "CommStats",
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
def ns_flops(shape: Sequence[int], steps: int, *, restarts: Sequence[int] | None = None) -> int:
    """Floating point operations of ``steps`` Newton-Schulz iterations on a (d_out, d_in)
    matrix: with s = min(d_out, d_in), l = max(d_out, d_in), one iteration is A = X X^T
    (2 s^2 l), A A (2 s^3) and B X (2 s^2 l), so ``steps * (4 s^2 l + 2 s^3)``. With
    ``restarts`` (not None): the Gram form's (``reference.newton_schulz_flops``, full
    products), as the owners compute it for a group with ``ns_method`` "gram"."""
    small, large = sorted(int(d) for d in shape)
    if restarts is not None:
        return newton_schulz_flops(small, large, steps, gram=True, restarts=restarts, symmetric=False)
    return steps * (4 * small * small * large + 2 * small**3)


def matrix_ns_flops(bucket: Bucket) -> int:
    """``ns_flops`` of one matrix of ``bucket`` as its owner computes it: with the group's
    ``ns_blocks``, rb * cb blocks of (d_out / rb, d_in / cb), each in the form ``ns_method``
    picks for the block's shape."""
    rb, cb = ns_blocks(bucket.group)
    shape = ns_block_shape(bucket.shape, (rb, cb))
    return rb * cb * ns_flops(shape, bucket.group["ns_steps"],
                              restarts=gram_restarts(bucket.group, shape))


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


def _comm_device(group: Any, fallback: torch.device) -> torch.device:
    backend = str(dist.get_backend(group))
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------
def exchange_group(opt: MatrixOptimizer, p: DTensor) -> Any:
    """The process group a DTensor matrix's exchange runs on: ``process_group`` when given,
    else its mesh's group (1-D mesh) or the world (a mesh over every rank). A mesh over some
    ranks only (pipeline stages) needs ``process_group``: a group can be created only by all
    ranks together, which a step cannot ask for."""
    if opt.process_group is not None:
        return opt.process_group
    mesh = p.device_mesh
    if mesh.ndim == 1:
        return mesh.get_group()
    _, ranks = _mesh_facts(mesh)
    if len(ranks) == dist.get_world_size():
        return dist.group.WORLD
    raise ValueError(
        f"{type(opt).__name__}: a parameter lives on a {mesh.ndim}-D mesh over ranks "
        f"{sorted(ranks)}, not every rank; pass process_group= a group "
        "over exactly the mesh's ranks (dist.new_group(ranks), created on every rank)")


_MESH_FACTS: dict[int, tuple[Any, tuple[int, ...], tuple[int, ...]]] = {}


def _mesh_facts(mesh: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, global ranks row-major) of a device mesh, read once per mesh: validation asks
    at every step, and ``DeviceMesh.mesh`` builds a new tensor at every access."""
    cached = _MESH_FACTS.get(id(mesh))
    if cached is None or cached[0] is not mesh:
        grid = mesh.mesh
        cached = _MESH_FACTS[id(mesh)] = (mesh, tuple(grid.shape), tuple(grid.flatten().tolist()))
    return cached[1], cached[2]


def _group_ranks(group: Any) -> tuple[int, ...]:
    if group is dist.group.WORLD:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def param_layout(opt: MatrixOptimizer, p: DTensor, orientation: str, flatten: bool = False
                 ) -> tuple[MatrixLayout, Any, int]:
    """(layout, exchange group, this rank's group rank) of a DTensor matrix: pure functions of
    its global shape and placements, the same on every rank."""
    group = exchange_group(opt, p)
    mesh_shape, mesh_ranks = _mesh_facts(p.device_mesh)
    layout = _cached_layout(tuple(p.shape), mesh_shape, tuple(p.placements), mesh_ranks,
                            _group_ranks(group), orientation, flatten)
    return layout, group, _rank(group)


@functools.lru_cache(maxsize=1024)
def _cached_layout(shape: tuple, mesh_shape: tuple, placements: tuple, mesh_ranks: tuple,
                   group_ranks: tuple, orientation: str, flatten: bool) -> MatrixLayout:
    return matrix_layout(shape, mesh_shape, placements, mesh_ranks, group_ranks, orientation, flatten)


def stack_layout(opt: MatrixOptimizer, p: DTensor, orientation: str) -> tuple[StackLayout, Any, int]:
    """(layouts of every expert, exchange group, this rank's group rank) of a 3-D DTensor
    expert stack: the same on every rank."""
    group = exchange_group(opt, p)
    mesh_shape, mesh_ranks = _mesh_facts(p.device_mesh)
    layouts = _cached_stack_layouts(tuple(p.shape), mesh_shape, tuple(p.placements), mesh_ranks,
                                    _group_ranks(group), orientation)
    return layouts, group, _rank(group)


@functools.lru_cache(maxsize=256)
def _cached_stack_layouts(shape: tuple, mesh_shape: tuple, placements: tuple, mesh_ranks: tuple,
                          group_ranks: tuple, orientation: str) -> StackLayout:
    return stack_layouts(shape, mesh_shape, placements, mesh_ranks, group_ranks, orientation)


def stack_sharded_inside(opt: MatrixOptimizer, p: Tensor, orientation: str) -> bool:
    """Whether an expert stack is a DTensor sharded inside its experts' matrices (each
    expert's Newton–Schulz then needs the exchange)."""
    return isinstance(p, DTensor) and not stack_layout(opt, p, orientation)[0].whole_experts


def describe_layout(opt: MatrixOptimizer, bucket: Bucket, p: Tensor) -> None:
    """Set the bucket's layout, exchange group and group rank: a DTensor's blocks, or the
    whole matrix on every rank of ``process_group`` (DDP work splitting); none otherwise."""
    if isinstance(p, DTensor) and bucket.experts is not None:
        # An expert stack: the exchange only when it is sharded inside its experts. Matrix
        # e of the exchange is expert e; this rank's members are its experts, in order.
        stack, group, rank = stack_layout(opt, p, bucket.orientation)
        if stack.whole_experts:
            return
        first = stack.experts[rank][0]
        bucket.layout = stack.matrices[min(first, len(stack.matrices) - 1)]
        bucket.stack_layouts, bucket.first_matrix = stack.matrices, first
        bucket.process_group, bucket.group_rank = group, rank
    elif isinstance(p, DTensor):
        bucket.layout, bucket.process_group, bucket.group_rank = param_layout(
            opt, p, bucket.orientation, bucket.flatten)
    elif opt.process_group is not None and _world(opt.process_group) > 1:
        bucket.layout = replicated_layout(bucket.shape, _world(opt.process_group))
        bucket.process_group, bucket.group_rank = opt.process_group, _rank(opt.process_group)


def check_layout(opt: MatrixOptimizer, gi: int, pi: int, p: Tensor, rule: Any) -> None:
    """A DTensor of a matrix rule must be laid out in blocks (``trasmuon.layout``: Replicate,
    Shard and _StridedShard placements, contiguous shards) over the ranks of its exchange
    group. Raised when the parameter is added and again before a step changes anything (the
    answer depends only on the global layout, so it is the same on every rank). AdamW takes
    any layout."""
    group = opt.param_groups[gi] if gi < len(opt.param_groups) else {}
    if not isinstance(p, DTensor) or not rule.matrix:
        return
    name = type(opt).__name__
    label = opt._label(gi, pi)
    orientation = group.get("orientation", "out_in")
    try:
        if group.get("stacked") and p.ndim == 3:
            stack_layout(opt, p, orientation)
        else:
            param_layout(opt, p, orientation, bool(group.get("flatten", False)))
    except NotImplementedError as exc:
        raise NotImplementedError(
            f"{name}: {label} is a DTensor with placements {tuple(p.placements)} on a "
            f"{p.device_mesh.ndim}-D mesh that rule {rule.name!r} cannot take: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{name}: {label}: {exc}") from None


def _comm_group(opt: MatrixOptimizer) -> Any:
    """The group the agreement all-reduce runs on: ``process_group``, or the exchange group
    of the first DTensor matrix."""
    if opt.process_group is not None:
        return opt.process_group
    for group in opt.param_groups:
        for p in group["params"]:
            # REGISTRY.get: an unknown rule set on a group later is validation's to report
            # (through the agreement), not a local error here.
            rule = REGISTRY.get(opt.rule_of(group, p))
            if isinstance(p, DTensor) and rule is not None and rule.matrix:
                try:
                    return exchange_group(opt, p)
                except ValueError:
                    continue
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
    for gi, _, p, grad, rule_name in work or ():
        i = index[id(p)]
        flags[i, _HAS_GRAD], flags[i, _NO_GRAD] = 1, 0
        lg = local(grad)
        fallback = lg.device
        if isinstance(p, DTensor) and get_rule(rule_name).matrix:
            flatten = bool(opt.param_groups[gi].get("flatten", False))
            stacked = bool(opt.param_groups[gi].get("stacked", False))
            if (not isinstance(grad, DTensor) or tuple(grad.placements) != tuple(p.placements)
                    or tuple(lg.shape) != tuple(p.to_local().shape)
                    or (not stacked and not _holds_its_block(opt, p, lg, flatten))):
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
            "sharded), so every rank must have a gradient for it or none must (DDP "
            "with find_unused_parameters=True and FSDP2 guarantee this). The step was not "
            "taken and nothing was changed")
    culprit = next((i for i, r in enumerate(rows) if r[_BAD_LAYOUT]), None)
    if culprit is not None:
        raise RuntimeError(
            f"{name}: {opt._label(*labels[culprit])}: on some rank the local shard of the "
            "parameter or of its gradient is not the block its placements give (or the "
            "gradient is not a DTensor with the parameter's placements). The step was not "
            "taken and nothing was changed")
    culprit = next((i for i, r in enumerate(rows) if r[_NON_FINITE]), None)
    if culprit is not None:
        raise RuntimeError(
            f"{name}: {opt._label(*labels[culprit])} has a non-finite gradient (NaN or Inf) "
            "on at least one rank; the step was not taken and no weight or optimizer state "
            "was changed")


def _holds_its_block(opt: MatrixOptimizer, p: DTensor, local_grad: Tensor, flatten: bool) -> bool:
    """Whether this rank's shards of ``p`` and of its gradient have the block's shape."""
    try:
        layout, _, me = param_layout(opt, p, "out_in", flatten)
    except (ValueError, NotImplementedError):
        return False
    expected = layout.blocks[me].shape

    def block(t: Tensor) -> tuple[int, ...]:
        return (t.shape[0], math.prod(t.shape[1:])) if flatten and t.ndim > 2 else tuple(t.shape)

    return block(p.to_local()) == expected and block(local_grad) == expected


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
class StepExchange:
    """The exchange of one step over one process group, for every bucket whose Newton–Schulz
    involves other ranks: one all-to-all of the Newton–Schulz inputs' blocks to each matrix's
    owner, Newton–Schulz of whole matrices there, and one all-to-all of O's blocks (with O's
    row sums of squares when the rule needs them) back to every rank that holds a block.

    Both all-to-alls are asynchronous: the input exchange is posted before any local
    Newton–Schulz runs, the output exchange before the ``post`` stage of the buckets that
    need nothing from it (see :func:`run_matrix_stages`). The pieces and their places in the
    byte buffers are planned once (``trasmuon.layout.ExchangePlan``); the buffers are
    allocated with the plan. The programs pack and unpack their blocks (``pack_input``,
    ``owner_stage``, ``unpack_output``): nothing here depends on the backend."""

    def __init__(self, opt: MatrixOptimizer, group: Any, buckets: list[Bucket],
                 loads: list[float]) -> None:
        self.opt, self.group, self.buckets = opt, group, buckets
        self.world, self.me = _world(group), _rank(group)
        entries, self.owned = [], []
        for b in buckets:
            ranges = split_counts(b.exchange_count, self.world, loads, matrix_ns_flops(b))
            owners = tuple(r for r, (s0, s1) in enumerate(ranges) for _ in range(s0, s1))
            start, stop = ranges[self.me]
            self.owned.append((start, stop))
            entries.append(ExchangeEntry(b.layout, owners, b.program.exchange_dtype.itemsize,
                                         b.program.row_sums_dtype.itemsize if b.rule.needs_row_sumsq else 0,
                                         b.stack_layouts))
            b.exchange = self
        self.plan = ExchangePlan(entries, self.world, rank=self.me)
        device = _comm_device(group, buckets[0].device)
        self.owners = [b.program.owner_stage(stop - start) if stop > start else None
                       for b, (start, stop) in zip(buckets, self.owned, strict=True)]
        self.send_x_sizes, self.send_x = self.plan.parts(self.plan.inputs, self.me, sending=True)
        self.recv_x_sizes, self.recv_x = self.plan.parts(self.plan.inputs, self.me, sending=False)
        self.send_o_sizes, self.send_o = self.plan.parts(self.plan.outputs, self.me, sending=True)
        self.recv_o_sizes, self.recv_o = self.plan.parts(self.plan.outputs, self.me, sending=False)
        self.local_x = self.plan.local(self.plan.inputs, self.me)
        self.local_o = self.plan.local(self.plan.outputs, self.me)
        local_bytes = max([p.nbytes for p in self.local_x + self.local_o] + [0])

        def buffer(n: int) -> Tensor:
            return torch.empty(n, dtype=torch.uint8, device=device)

        self.buffers = {name: buffer(sum(sizes)) for name, sizes in (
            ("send_x", self.send_x_sizes), ("recv_x", self.recv_x_sizes),
            ("send_o", self.send_o_sizes), ("recv_o", self.recv_o_sizes))}
        self.scratch = buffer(local_bytes)  # a piece this rank keeps, between pack and unpack
        # Whether a direction moves anything at all, on any rank (DDP's owners hold their
        # inputs: no input exchange).
        self.moves_inputs, self.moves_outputs = self.plan.moves_inputs, self.plan.moves_outputs
        self._work: Any = None

    # The owner's matrix k of bucket e is the entry's matrix start + k; a rank's member m of
    # a bucket is the entry's matrix first_matrix + m.
    def _owner_index(self, e: int, i: int) -> int:
        return i - self.owned[e][0]

    def _member(self, e: int, i: int) -> int:
        return i - self.buckets[e].first_matrix

    def _all_to_all(self, out: Tensor, inp: Tensor, out_sizes: list[int], in_sizes: list[int],
                    op: str, moves: bool) -> Any:
        if not moves:
            return None
        self.opt.comm_stats.add(op, sum(in_sizes), sum(out_sizes))
        return dist.all_to_all_single(out, inp, out_sizes, in_sizes, group=self.group, async_op=True)

    def post_inputs(self) -> None:
        """Pack this rank's blocks of the inputs for their owners and post the all-to-all."""
        send = self.buffers["send_x"]
        for piece, offset in self.send_x:
            b = self.buckets[piece.entry]
            b.program.pack_input(self._member(piece.entry, piece.index), send[offset:offset + piece.nbytes])
        self._work = self._all_to_all(self.buffers["recv_x"], send, self.recv_x_sizes,
                                      self.send_x_sizes, "all_to_all(X)", self.moves_inputs)

    def orthogonalize_owned(self) -> None:
        """Wait for the inputs, run Newton–Schulz on the matrices this rank owns, pack O's
        blocks for their holders and post the all-to-all back."""
        for piece in self.local_x:  # blocks the owner holds itself
            data = self.scratch[:piece.nbytes]
            self.buckets[piece.entry].program.pack_input(self._member(piece.entry, piece.index), data)
            self.owners[piece.entry].unpack_input(self._owner_index(piece.entry, piece.index),
                                                  piece.block, data)
        if self._work is not None:
            self._work.wait()
        recv = self.buffers["recv_x"]
        for piece, offset in self.recv_x:
            self.owners[piece.entry].unpack_input(self._owner_index(piece.entry, piece.index),
                                                  piece.block, recv[offset:offset + piece.nbytes])
        for owner in self.owners:
            if owner is not None:
                owner.run()
        send = self.buffers["send_o"]
        for piece, offset in self.send_o:
            self.owners[piece.entry].pack_output(self._owner_index(piece.entry, piece.index),
                                                 piece.block, send[offset:offset + piece.nbytes])
        for piece in self.local_o:
            data = self.scratch[:piece.nbytes]
            self.owners[piece.entry].pack_output(self._owner_index(piece.entry, piece.index),
                                                 piece.block, data)
            self.buckets[piece.entry].program.unpack_output(self._member(piece.entry, piece.index), data)
        self._work = self._all_to_all(self.buffers["recv_o"], send, self.recv_o_sizes,
                                      self.send_o_sizes, "all_to_all(O)", self.moves_outputs)

    def receive_outputs(self) -> None:
        """Wait for O's blocks and hand them to the programs."""
        if self._work is not None:
            self._work.wait()
        self._work = None
        recv = self.buffers["recv_o"]
        for piece, offset in self.recv_o:
            self.buckets[piece.entry].program.unpack_output(self._member(piece.entry, piece.index),
                                                            recv[offset:offset + piece.nbytes])
        for b in self.buckets:
            b.program.outputs_received()


def plan_exchanges(opt: MatrixOptimizer, plan: StepPlan) -> None:
    """One :class:`StepExchange` per process group for the buckets whose Newton–Schulz
    involves other ranks: sharded matrices, and replicated ones with ``process_group`` (DDP
    work splitting). Ownership is balanced by Newton–Schulz FLOPs over all of the group's
    buckets; groups in the order of their ranks (the same on every rank)."""
    by_group: dict[tuple[int, ...], tuple[Any, list[Bucket]]] = {}
    for b in plan.matrices:
        b.exchange = None
        if b.layout is None or b.layout.world == 1:
            continue
        by_group.setdefault(_group_ranks(b.process_group), (b.process_group, []))[1].append(b)
    plan.exchanges = []
    for ranks in sorted(by_group):
        group, buckets = by_group[ranks]
        plan.exchanges.append(StepExchange(opt, group, buckets, [0.0] * len(ranks)))


def run_matrix_stages(opt: MatrixOptimizer, plan: StepPlan) -> None:
    """``prepare`` to ``finish`` of every matrix bucket (and AdamW while the inputs travel):
    the input all-to-alls are posted first; Newton–Schulz of the buckets this rank holds alone
    runs while they are in flight; each exchange's owners then orthogonalize and post O's
    blocks back, and the ``post`` stage of the local buckets runs while those travel."""
    for b in plan.matrices:
        b.program.prepare()
    for exchange in plan.exchanges:
        exchange.post_inputs()
    for b in plan.adamw:
        b.program.run()
    for b in plan.matrices:
        if b.exchange is None:
            b.program.orthogonalize()
    for exchange in plan.exchanges:
        exchange.orthogonalize_owned()
    for b in plan.matrices:
        if b.exchange is None:
            b.program.post()
    for exchange in plan.exchanges:
        exchange.receive_outputs()
    for b in plan.matrices:
        if b.exchange is not None:
            b.program.post()
    reduce_rows(opt, plan)
    for b in plan.matrices:
        b.program.finish()


def reduce_rows(opt: MatrixOptimizer, plan: StepPlan) -> None:
    """One all-reduce per (device, dtype, process group) of the step's sums over rows of
    sharded matrices: each rank's entries outside its mask (columns it does not hold, a
    replica's copy) are zeroed first, so that the sum counts every entry of every matrix
    once."""
    for group, buf, outside in plan.sharded_reductions():
        if _world(group) == 1 or buf.numel() == 0:
            continue
        buf.masked_fill_(outside, 0)  # (a fill, not a multiply: a stale inf times 0 is NaN)
        dist.all_reduce(buf, group=group)
        nbytes = buf.numel() * buf.element_size()
        opt.comm_stats.add("all_reduce(rows)", nbytes, nbytes)
