"""TrasMuon, NorMuon and Muon under ``torch.distributed``: DDP and FSDP2 (see docs/distributed.md).

The single-process pipeline (``optimizer.MatrixOptimizer.step``) runs unchanged on every rank;
this module overrides its hooks:

``_orthogonalize``
    Newton-Schulz (docs/rule.md step 3) is the only expensive stage, so each rank computes it for its
    share of the step's matrices (balanced by Newton-Schulz FLOPs, see :func:`ns_flops` and
    :func:`assign_owners`) and the results are exchanged:

    * a replicated parameter (plain tensor, DDP): every rank holds the whole momentum; the
      owner orthogonalizes it and broadcasts O (in ``ns_dtype``). One asynchronous broadcast
      per owner carries all of that owner's matrices, packed into one byte buffer.
    * a row-sharded parameter (DTensor ``Shard(0)`` on a 1-D mesh, FSDP2): one all-to-all
      sends every rank's rows of M (cast to ``ns_dtype``) to the matrix's owner, which
      assembles and orthogonalizes the whole matrix; a second all-to-all sends each rank its
      rows of O.

    Newton-Schulz is computed once per matrix, by the base class's ``_orthogonalize``, on the
    same input as in a single process, so O is bitwise the single-process O for every
    ``ns_dtype`` (casting M to ``ns_dtype`` before sending is the cast NS itself does first).
``_full_shape`` / ``_row_reduce``
    A row-sharded matrix runs the rest of the rule on its local rows with its global shape;
    its two sums over rows (column energies and ||O_base||_F^2) are all-reduced.
``_init_state`` / ``_update_matrix``
    The state of a row-sharded matrix is DTensors where it is per element or per row
    (``momentum``: like the parameter; ``row_v``: ``Shard(0)`` of length d_out) and plain
    tensors, identical on every rank, where it is per column or per matrix (``energy_ref``,
    ``c_ema``, the schedule-free sums, ``c_last``, ``step``). ``torch.distributed.checkpoint``
    saves and loads that layout as it is.
``_collect`` / ``_check_finite_grads``
    Checks DTensor layouts, and (``check_consistency``, on by default, or ``check_finite``)
    agrees with one small all-reduce on which parameters have a gradient and whether all are
    finite, so that a rank-dependent gradient set raises the same error on every rank
    instead of hanging a collective.

Everything else (momentum, row moments, gate, weight update, AdamW) is computed redundantly on
every rank (replicated) or elementwise/per row on each shard (sharded), from identical inputs,
so all ranks end a step with identical weights and optimizer state.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import reference as ref
from .optimizer import MATRIX_RULES, AdamW, MatrixJob, MatrixOptimizer, Muon, NorMuon, TrasMuon

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch 2.4
    from torch.distributed._tensor import DTensor, Shard

__all__ = [
    "CommStats",
    "DistributedAdamW",
    "DistributedMixin",
    "DistributedMuon",
    "DistributedNorMuon",
    "DistributedTrasMuon",
    "assign_owners",
    "distributed",
    "ns_flops",
    "shard_rows",
]

# Every matrix starts at a multiple of this many bytes in a packed buffer, so that a slice of
# the byte buffer can be viewed as any dtype.
_ALIGN = 16

# Flags of the agreement all-reduce (MAX over ranks), one row per parameter.
_HAS_GRAD, _NO_GRAD, _NON_FINITE, _BAD_LAYOUT = range(4)


# --------------------------------------------------------------------------------------
# Planning: who orthogonalizes what (identical on every rank, no communication)
# --------------------------------------------------------------------------------------
def ns_flops(shape: Sequence[int], steps: int) -> int:
    """Floating point operations of ``steps`` Newton-Schulz iterations on a (d_out, d_in)
    matrix: with s = min(d_out, d_in), l = max(d_out, d_in), one iteration is A = X X^T
    (2 s^2 l), A A (2 s^3) and B X (2 s^2 l), so ``steps * (4 s^2 l + 2 s^3)``."""
    small, large = sorted(int(d) for d in shape)
    return steps * (4 * small * small * large + 2 * small**3)


def assign_owners(costs: Sequence[int | float], world_size: int) -> list[int]:
    """The rank that orthogonalizes each matrix: longest-processing-time-first greedy on
    ``costs`` (largest first, each to the least loaded rank; ties by index, then by rank).
    Deterministic, so every rank computes the same assignment from the same job list; the
    largest load is at most 4/3 of the optimum."""
    owners = [0] * len(costs)
    loads = [(0, rank) for rank in range(world_size)]  # a heap of (load, rank)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return owners


def shard_rows(d_out: int, world_size: int) -> list[tuple[int, int]]:
    """Row range [start, stop) of each rank for a ``Shard(0)`` layout: ``torch.chunk``
    semantics (ceil(d_out / world) rows per rank, the last ranks shorter or empty), which
    is what DTensor and FSDP2 use."""
    chunk = -(-d_out // world_size)
    return [(min(r * chunk, d_out), min((r + 1) * chunk, d_out)) for r in range(world_size)]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * dtype.itemsize


def _pack(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """One uint8 buffer holding ``tensors`` back to back, each at an aligned offset."""
    sizes = [_aligned(t.numel() * t.element_size()) for t in tensors]
    buf = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    offset = 0
    for t, size in zip(tensors, sizes, strict=True):
        if t.numel():
            flat = t.contiguous().reshape(-1).view(torch.uint8)
            buf[offset : offset + flat.numel()].copy_(flat)
        offset += size
    return buf


def _unpack(buf: Tensor, offset: int, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """A view of ``buf[offset:]`` as a tensor of ``shape`` and ``dtype`` (no copy)."""
    nbytes = _nbytes(shape, dtype)
    return buf[offset : offset + nbytes].view(dtype).view(tuple(shape))


# The memory layout of O. The update stage's sums over a row (and over a column) round
# differently on a row-major and a column-major O, so every rank must see O in the layout the
# single-process run has: ``reference.newton_schulz`` orthogonalizes a tall matrix
# (d_out > d_in) transposed and returns the transpose of a contiguous tensor (column-major).
# Row blocks of a column-major O travel as column blocks of O^T and arrive column-major too.
def _column_major(shape: Sequence[int]) -> bool:
    return shape[0] > shape[1]


def _in_layout(ortho: Tensor, column_major: bool) -> Tensor:
    if column_major:
        return ortho if ortho.mT.is_contiguous() else ortho.mT.contiguous().mT
    return ortho if ortho.is_contiguous() else ortho.contiguous()


def _rows_payload(ortho: Tensor, start: int, stop: int, column_major: bool) -> Tensor:
    """Rows [start, stop) of O as the contiguous tensor that travels."""
    return ortho.mT[:, start:stop] if column_major else ortho[start:stop]


def _unpack_rows(
    buf: Tensor, offset: int, rows: int, cols: int, dtype: torch.dtype, column_major: bool
) -> Tensor:
    if column_major:
        return _unpack(buf, offset, (cols, rows), dtype).mT
    return _unpack(buf, offset, (rows, cols), dtype)


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


@dataclasses.dataclass
class _ShardedJob(MatrixJob):
    """A row-sharded matrix's job on local tensors, with the global (d_out, d_in)."""

    full_shape: tuple[int, int] = (0, 0)


class _LocalState(MutableMapping):
    """The state of a sharded matrix seen through its local tensors: a DTensor entry reads as
    its local shard (in-place updates land in the DTensor); a new key is stored as given
    (the rule only creates replicated per-matrix entries, e.g. ``energy_ref``)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def __getitem__(self, key: str) -> Any:
        value = self._state[key]
        return value.to_local() if isinstance(value, DTensor) else value

    def __setitem__(self, key: str, value: Any) -> None:
        old = self._state.get(key)
        if isinstance(old, DTensor):
            old.to_local().copy_(value)
        else:
            self._state[key] = value

    def __delitem__(self, key: str) -> None:
        del self._state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


# --------------------------------------------------------------------------------------
# The mixin
# --------------------------------------------------------------------------------------
class DistributedMixin:
    """Makes a :class:`~trasmuon.optimizer.MatrixOptimizer` subclass work under
    ``torch.distributed`` (put it first in the bases, or use :func:`distributed`).

    Extra keyword arguments:
        process_group: the group whose ranks share the work (default: the world). Plain
            (replicated) parameters must be identical on its ranks and get identical
            gradients (DDP); DTensor parameters of a matrix rule must be ``Shard(0)`` on a
            1-D mesh over exactly these ranks, in the same order (FSDP2's default).
        check_consistency: before anything is changed, one all-reduce of 4 bytes per
            parameter checks that every parameter has a gradient on all ranks or on none
            (and that every DTensor shard has the expected rows), and raises the same
            ``RuntimeError`` on every rank otherwise, instead of a hang or a silent
            divergence. It costs one small collective and one host sync per step; with
            ``False`` the step has neither, and the wrapper (DDP, FSDP2) is trusted to give
            every rank the same set of gradients. With ``check_finite=True`` the same
            all-reduce carries the finiteness flags (a non-finite value in one shard must
            stop every rank), whatever this flag says.

    ``comm_stats`` holds the :class:`CommStats` of the last step.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *args: Any,
        process_group: Any = None,
        check_consistency: bool = True,
        **kwargs: Any,
    ) -> None:
        name = f"{type(self).__name__}"
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{name}: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group first (or use the single-process class)"
            )
        if not isinstance(check_consistency, bool):
            raise ValueError(f"{name}: check_consistency must be a bool, got {check_consistency!r}")
        group = dist.group.WORLD if process_group is None else process_group
        if dist.get_rank(group) < 0:
            raise ValueError(f"{name}: this rank is not a member of process_group")
        self.process_group = group
        self.check_consistency = check_consistency
        self.comm_stats = CommStats()
        super().__init__(params, *args, **kwargs)

    # ----------------------------------------------------------------------------------
    # Plumbing
    # ----------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["check_consistency"] = self.check_consistency
        # A process group is a handle to this process's communicator: it cannot be pickled,
        # so it travels as its name and ranks and is looked up again when loaded.
        state.pop("process_group", None)
        state["_process_group_ref"] = _group_ref(self.process_group)
        state.pop("comm_stats", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict passes only "state" and "param_groups": keep the group and the
        # options this optimizer was built with. Unpickling and deepcopy pass a reference
        # to the group, which must exist in this process.
        ref_ = state.pop("_process_group_ref", None)
        if "process_group" in self.__dict__:
            state.setdefault("process_group", self.process_group)
        elif ref_ is not None:
            state["process_group"] = _resolve_group(ref_, type(self).__name__)
        else:
            state["process_group"] = dist.group.WORLD
        state.setdefault("check_consistency", self.__dict__.get("check_consistency", True))
        state.setdefault("comm_stats", self.__dict__.get("comm_stats", CommStats()))
        super().__setstate__(state)

    @property
    def _world(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def _rank(self) -> int:
        return dist.get_rank(self.process_group)

    def _global_rank(self, group_rank: int) -> int:
        if self.process_group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.process_group, group_rank)

    def _comm_device(self, fallback: torch.device) -> torch.device:
        backend = str(dist.get_backend(self.process_group))
        if "nccl" in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return fallback

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            for pi, p in enumerate(group["params"]):
                self._check_layout(index, pi, p, self.rule_of(group, p))
        except Exception:
            self.param_groups.pop()
            raise

    def _check_layout(self, gi: int, pi: int, p: Tensor, rule: str) -> None:
        """A DTensor of a matrix rule must be Shard(0) over a 1-D mesh of our ranks (the same
        answer on every rank: it depends only on the global layout)."""
        if not isinstance(p, DTensor) or rule not in MATRIX_RULES:
            return
        name = type(self).__name__
        if self.param_groups[gi]["orientation"] == "in_out":
            raise NotImplementedError(
                f"{name}: {self._label(gi, pi)} is a DTensor stored (in, out) "
                "(orientation='in_out'); sharding its rows shards the matrix's input "
                "features, which the distributed matrix rules do not support. Replicate it "
                "(DDP) or store it (out, in) like nn.Linear"
            )
        mesh = p.device_mesh
        if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise NotImplementedError(
                f"{name}: {self._label(gi, pi)} is a DTensor with placements "
                f"{tuple(p.placements)} on a {mesh.ndim}-D mesh; rule {rule!r} supports "
                "DTensor parameters sharded on rows only (Shard(0) on a 1-D mesh, FSDP2's "
                "default). Use FSDP2's default sharding for this parameter, or put it on AdamW"
            )
        ranks = dist.get_process_group_ranks(self.process_group)
        if mesh.mesh.flatten().tolist() != ranks:
            raise ValueError(
                f"{name}: {self._label(gi, pi)} is sharded over ranks "
                f"{mesh.mesh.flatten().tolist()}, but the optimizer's process_group has ranks "
                f"{ranks}; pass the mesh's group as process_group"
            )

    # ----------------------------------------------------------------------------------
    # The step
    # ----------------------------------------------------------------------------------
    def step(self, closure: Any = None) -> Any:
        self.comm_stats = CommStats()
        return super().step(closure)

    def _collect(self):
        work = super()._collect()
        for gi, _, items in work:
            for pi, p, _, rule in items:
                self._check_layout(gi, pi, p, rule)
        self._agree(work)
        return work

    def _check_finite_grads(self, work) -> None:
        """Done by ``_agree`` (inside ``_collect``): a shard's verdict must reach every rank."""

    def _agree(self, work) -> None:
        """4 uint8 flags per parameter: has a gradient, lacks one, has a non-finite gradient
        (with ``check_finite``), has a local shard that is not the ``Shard(0)`` chunk this
        module expects. With ``check_consistency`` or ``check_finite`` they are all-reduced
        (MAX), and every rank raises the same error; otherwise only this rank's flags are
        read (no collective, no device sync) and a bad local shard raises on this rank only
        (the other ranks then fail in, or hang at, their next collective)."""
        name = type(self).__name__
        labels, index = [], {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                index[p] = len(labels)
                labels.append((gi, pi))
        flags = torch.zeros(len(labels), 4, dtype=torch.uint8)
        flags[:, _NO_GRAD] = 1
        finite_rows, finite_flags = [], []
        fallback = torch.device("cpu")
        world, me = self._world, self._rank
        for _, _, items in work:
            for _, p, grad, rule in items:
                i = index[p]
                flags[i, _HAS_GRAD], flags[i, _NO_GRAD] = 1, 0
                local = grad.to_local() if isinstance(grad, DTensor) else grad
                fallback = local.device
                if isinstance(p, DTensor) and rule in MATRIX_RULES:
                    start, stop = shard_rows(p.shape[0], world)[me]
                    expected = (stop - start, p.shape[1])
                    if (
                        not isinstance(grad, DTensor)
                        or tuple(grad.placements) != tuple(p.placements)
                        or tuple(p.to_local().shape) != expected
                        or tuple(local.shape) != expected
                    ):
                        flags[i, _BAD_LAYOUT] = 1
                if self.check_finite:
                    finite_rows.append(i)
                    finite_flags.append(~torch.isfinite(local).all())
        communicate = world > 1 and (self.check_consistency or self.check_finite)
        device = self._comm_device(fallback) if communicate else torch.device("cpu")
        flags = flags.to(device)
        if finite_rows:
            rows = torch.tensor(finite_rows, device=device)
            flags[rows, _NON_FINITE] = torch.stack([f.to(device) for f in finite_flags]).to(torch.uint8)
        if communicate:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
            self.comm_stats.add("all_reduce(agree)", flags.numel(), flags.numel())
        rows = flags.tolist()  # the host sync (a CPU tensor unless flags were communicated)
        culprit = next((i for i, r in enumerate(rows) if r[_HAS_GRAD] and r[_NO_GRAD]), None)
        if culprit is not None:
            raise RuntimeError(
                f"{name}: {self._label(*labels[culprit])} has a gradient on some ranks of the "
                "process group and none on others; the optimizer state is replicated (or "
                "row-sharded), so every rank must have a gradient for it or none must (DDP "
                "with find_unused_parameters=True and FSDP2 guarantee this). The step was not "
                "taken and nothing was changed"
            )
        culprit = next((i for i, r in enumerate(rows) if r[_BAD_LAYOUT]), None)
        if culprit is not None:
            raise RuntimeError(
                f"{name}: {self._label(*labels[culprit])}: on some rank the local shard of the "
                "parameter or of its gradient is not the Shard(0) chunk that torch.chunk gives "
                "(or the gradient is not a DTensor with the parameter's placements). The step "
                "was not taken and nothing was changed"
            )
        culprit = next((i for i, r in enumerate(rows) if r[_NON_FINITE]), None)
        if culprit is not None:
            raise RuntimeError(
                f"{name}: {self._label(*labels[culprit])} has a non-finite gradient (NaN or Inf) "
                "on at least one rank; the step was not taken and no weight or optimizer state "
                "was changed"
            )

    def _init_state(self, p: Tensor, group: dict[str, Any], rule: str) -> dict[str, Tensor]:
        state = self.state[p]
        if isinstance(p, DTensor) and rule in ("trasmuon", "normuon") and "row_v" not in state:
            # v is per row: a DTensor sharded like the parameter's rows (the base class would
            # make a plain length-d_out tensor). Everything else the base class makes is
            # right: zeros_like(p) is a DTensor, the per-column gate state is replicated.
            local = p.to_local()
            state["row_v"] = DTensor.from_local(
                torch.zeros(local.shape[0], dtype=ref.state_dtype(p.dtype), device=local.device),
                p.device_mesh, [Shard(0)], run_check=False, shape=(p.shape[0],), stride=(1,),
            )
        return super()._init_state(p, group, rule)

    def _full_shape(self, job: MatrixJob) -> tuple[int, int]:
        if isinstance(job, _ShardedJob):
            return job.full_shape
        return super()._full_shape(job)

    def _row_reduce(self, job: MatrixJob):
        if isinstance(job, _ShardedJob) and self._world > 1:
            return self._all_reduce_sum
        return super()._row_reduce(job)

    def _all_reduce_sum(self, partial: Tensor) -> Tensor:
        total = partial.contiguous().clone()
        dist.all_reduce(total.reshape(-1), group=self.process_group)
        nbytes = total.numel() * total.element_size()
        self.comm_stats.add("all_reduce(rows)", nbytes, nbytes)
        return total

    def _update_matrix(self, job: MatrixJob, ortho: Tensor) -> None:
        p = job.param
        if not isinstance(p, DTensor):
            return super()._update_matrix(job, ortho)
        local = _ShardedJob(
            param=p.to_local(), grad_wide=job.grad_wide.to_local(),
            ns_input=job.ns_input.to_local(), group=job.group, rule=job.rule,
            state=_LocalState(job.state), step=job.step, lr=job.lr, full_shape=tuple(p.shape),
        )
        super()._update_matrix(local, ortho)
        if self.diagnostics_enabled and local.param in self._diagnostics:
            self._diagnostics[p] = self._diagnostics.pop(local.param)

    # ----------------------------------------------------------------------------------
    # Distributed Newton-Schulz
    # ----------------------------------------------------------------------------------
    def _orthogonalize(self, jobs: list[MatrixJob]) -> list[Tensor]:
        """O for every job, in job order: whole matrices for replicated params, this rank's
        rows for row-sharded ones, in the memory layout of the single-process O. Collectives,
        in this order on every rank: one all-to-all of M rows (if any matrix is sharded), one
        broadcast per rank that owns a replicated matrix, one all-to-all of O rows (if any
        matrix is sharded)."""
        world, me = self._world, self._rank
        sharded = [isinstance(job.ns_input, DTensor) for job in jobs]
        if world == 1:  # a DTensor on a 1-rank mesh holds the whole matrix
            return super()._orthogonalize([
                dataclasses.replace(job, ns_input=job.ns_input.to_local()) if sh else job
                for job, sh in zip(jobs, sharded, strict=True)
            ])
        if not jobs:  # then no rank has a job (the job list is the same on every rank)
            return []
        n = len(jobs)
        shapes = [tuple(job.ns_input.shape) for job in jobs]  # global shapes
        dtypes = [job.group["ns_dtype"] for job in jobs]
        colmajor = [_column_major(shape) for shape in shapes]
        owners = assign_owners([ns_flops(shapes[i], jobs[i].group["ns_steps"]) for i in range(n)], world)
        rows = [shard_rows(shapes[i][0], world) if sharded[i] else None for i in range(n)]
        inputs = [job.ns_input.to_local() if sh else job.ns_input for job, sh in zip(jobs, sharded, strict=True)]
        device = inputs[0].device
        any_sharded = any(sharded)

        def part_bytes(i: int, rank: int) -> int:  # bytes of rank's rows of sharded matrix i
            start, stop = rows[i][rank]
            return _aligned(_nbytes((stop - start, shapes[i][1]), dtypes[i]))

        def offsets_by_source(splits: list[int]) -> list[int]:
            return [sum(splits[:s]) for s in range(world)]

        # (1) All-to-all: every rank's rows of M (cast to ns_dtype: NS's own first step) to
        # the matrix's owner, in job order.
        works = []
        if any_sharded:
            send: list[list[Tensor]] = [[] for _ in range(world)]
            m_splits = [0] * world
            for i in range(n):
                if sharded[i] and owners[i] != me:
                    send[owners[i]].append(inputs[i].to(dtypes[i]))
                elif sharded[i]:
                    for s in range(world):
                        m_splits[s] += part_bytes(i, s) if s != me else 0
            m_send = _pack([t for ts in send for t in ts], device)
            m_recv = torch.empty(sum(m_splits), dtype=torch.uint8, device=device)
            send_splits = [sum(_aligned(t.numel() * t.element_size()) for t in ts) for ts in send]
            works.append(self._all_to_all(m_recv, m_send, m_splits, send_splits, "all_to_all(M)"))

        # (2) Replicated matrices: the broadcasts of owners before me are posted before my
        # Newton-Schulz (so they can overlap it), mine after it, then the rest.
        bcast_bytes = [0] * world
        for i in range(n):
            if not sharded[i]:
                bcast_bytes[owners[i]] += _aligned(_nbytes(shapes[i], dtypes[i]))
        bufs: list[Tensor | None] = [None] * world

        def post_broadcast(q: int) -> None:
            if bcast_bytes[q]:
                if q != me:
                    bufs[q] = torch.empty(bcast_bytes[q], dtype=torch.uint8, device=device)
                works.append(self._broadcast(bufs[q], q))

        for q in range(me):
            post_broadcast(q)

        mine = [i for i in range(n) if owners[i] == me]
        own_jobs = []
        if any_sharded:
            works[0].wait()
            base, offset = offsets_by_source(m_splits), [0] * world
        for i in mine:
            if not sharded[i]:
                own_jobs.append(jobs[i])
                continue
            parts = []
            for s in range(world):
                if s == me:
                    parts.append(inputs[i].to(dtypes[i]))
                    continue
                start, stop = rows[i][s]
                parts.append(_unpack(m_recv, base[s] + offset[s], (stop - start, shapes[i][1]), dtypes[i]))
                offset[s] += part_bytes(i, s)
            own_jobs.append(dataclasses.replace(jobs[i], ns_input=torch.cat(parts, dim=0)))
        results: list[Tensor | None] = [None] * n
        for i, ortho in zip(mine, super()._orthogonalize(own_jobs), strict=True):
            results[i] = _in_layout(ortho, colmajor[i])

        if bcast_bytes[me]:
            bufs[me] = _pack([_rows_payload(results[i], 0, shapes[i][0], colmajor[i])
                              for i in mine if not sharded[i]], device)
        for q in range(me, world):
            post_broadcast(q)

        # (3) All-to-all: every rank's rows of O from the owner, in job order.
        if any_sharded:
            send = [[] for _ in range(world)]
            o_splits = [0] * world
            for i in range(n):
                if sharded[i] and owners[i] == me:
                    for s in range(world):
                        if s != me:
                            send[s].append(_rows_payload(results[i], *rows[i][s], colmajor[i]))
                    # my own rows: the same layout as the rows that travel
                    start, stop = rows[i][me]
                    mine_rows = _rows_payload(results[i], start, stop, colmajor[i]).contiguous()
                    results[i] = mine_rows.mT if colmajor[i] else mine_rows
                elif sharded[i]:
                    o_splits[owners[i]] += part_bytes(i, me)
            o_send = _pack([t for ts in send for t in ts], device)
            o_recv = torch.empty(sum(o_splits), dtype=torch.uint8, device=device)
            send_splits = [sum(_aligned(t.numel() * t.element_size()) for t in ts) for ts in send]
            works.append(self._all_to_all(o_recv, o_send, o_splits, send_splits, "all_to_all(O)"))

        for work in works:
            work.wait()
        # Read positions per owner: in its part of o_recv, and in its broadcast buffer.
        o_offset = offsets_by_source(o_splits) if any_sharded else [0] * world
        b_offset = [0] * world
        for i in range(n):
            q = owners[i]
            if q == me:
                continue
            if sharded[i]:
                start, stop = rows[i][me]
                results[i] = _unpack_rows(o_recv, o_offset[q], stop - start, shapes[i][1],
                                          dtypes[i], colmajor[i])
                o_offset[q] += part_bytes(i, me)
            else:
                results[i] = _unpack_rows(bufs[q], b_offset[q], shapes[i][0], shapes[i][1],
                                          dtypes[i], colmajor[i])
                b_offset[q] += _aligned(_nbytes(shapes[i], dtypes[i]))
        return results

    def _broadcast(self, buf: Tensor, owner: int):
        nbytes = buf.numel()
        mine = owner == self._rank
        self.comm_stats.add("broadcast(O)", nbytes if mine else 0, 0 if mine else nbytes)
        return dist.broadcast(buf, src=self._global_rank(owner), group=self.process_group, async_op=True)

    def _all_to_all(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], op: str):
        self.comm_stats.add(op, inp.numel(), out.numel())
        return dist.all_to_all_single(
            out, inp, out_splits, in_splits, group=self.process_group, async_op=True
        )


def _group_ref(group: Any) -> tuple[str | None, tuple[int, ...]]:
    """(name, global ranks) of a process group: enough to find it again in this process."""
    if group is None or group is dist.group.WORLD:
        return ("WORLD", tuple(range(dist.get_world_size())))
    return (getattr(group, "group_name", None), tuple(dist.get_process_group_ranks(group)))


def _resolve_group(ref_: tuple[str | None, tuple[int, ...]], owner: str) -> Any:
    """The process group ``_group_ref`` described, or an error naming it (never another one)."""
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
        "order on every rank) before loading, or build a new optimizer with its process_group"
    )


_CLASSES: dict[type, type] = {}


def distributed(cls: type) -> type:
    """The distributed subclass of a :class:`~trasmuon.optimizer.MatrixOptimizer` subclass:
    ``distributed(TrasMuon)(params, lr=..., process_group=None, check_consistency=True)``.
    The same class object is returned for the same ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, MatrixOptimizer)):
        raise TypeError(f"distributed() needs a MatrixOptimizer subclass, got {cls!r}")
    if issubclass(cls, DistributedMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(
            f"Distributed{cls.__name__}", (DistributedMixin, cls),
            {"__module__": __name__, "__doc__": f"{cls.__name__} under torch.distributed "
             "(see trasmuon.distributed.DistributedMixin)."},
        )
    return _CLASSES[cls]


class DistributedTrasMuon(DistributedMixin, TrasMuon):
    """:class:`~trasmuon.TrasMuon` under torch.distributed (DDP or FSDP2); takes TrasMuon's
    arguments plus ``process_group`` and ``check_consistency`` (see :class:`DistributedMixin`)."""


class DistributedNorMuon(DistributedMixin, NorMuon):
    """:class:`~trasmuon.NorMuon` under torch.distributed (see :class:`DistributedMixin`)."""


class DistributedMuon(DistributedMixin, Muon):
    """:class:`~trasmuon.Muon` under torch.distributed (see :class:`DistributedMixin`)."""


class DistributedAdamW(DistributedMixin, AdamW):
    """:class:`~trasmuon.AdamW` with the same distributed plumbing (needed only when a param
    group names a matrix rule; plain AdamW is elementwise and needs nothing)."""


_CLASSES.update({
    TrasMuon: DistributedTrasMuon, NorMuon: DistributedNorMuon, Muon: DistributedMuon,
    AdamW: DistributedAdamW,
})
