"""The step plan: which parameters a step updates, grouped into buckets, with everything the
backends need to run them, built once and reused while nothing it depends on changes.

A :class:`Bucket` is the unit every stage runs on: the parameters of one param group that
take one rule, have one (oriented) shape, one param and grad dtype, one device and one
layout (plain, or a DTensor's mesh and placements), and have a gradient this step. AdamW buckets hold
parameters of any shapes. Each bucket gets a program for its backend from its rule
(:meth:`trasmuon.rules.Rule.program`).

The plan is keyed by a fingerprint of what it depends on (:func:`fingerprint`): the groups'
hyperparameters other than lr, which params have gradients, their shapes, dtypes, devices,
layouts and strides. A step whose fingerprint differs rebuilds the plan before anything is
changed; a step whose fingerprint matches reuses it, so the Triton backend issues the same
launches with the same arguments step after step (lr and the step counters are read from
device memory, gradient addresses from device tables refreshed in place when they move).

Per step (:meth:`StepPlan.begin`): the step counters advance, the device copies of every
group's lr are written, and the gradient tables are refreshed. Then the optimizer runs the
AdamW buckets and the matrix pipeline (see :mod:`trasmuon.rules`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from trasmuon_kernels._launch import TorchLaunch

from . import reference as ref
from .layout import Block, MatrixLayout
from .rules import MatrixRule, Program, Rule, StateEntry
from .rules._matrix import ORIENTATIONS

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch 2.4
    from torch.distributed._tensor import DTensor

BACKENDS = ("eager", "triton", "auto")
# Group keys that are not hyperparameters a plan depends on.
_NOT_PLANNED = frozenset({"params", "param_names", "lr", "initial_lr", "max_lr", "min_lr",
                          "base_lr", "base_momentum", "max_momentum", "swa_lr"})


def oriented(tensor: Tensor, orientation: str) -> Tensor:
    """The (out, in) view of a matrix stored with ``orientation`` (see ``ORIENTATIONS``)."""
    return tensor.mT if orientation == "in_out" else tensor


def matrix_view(tensor: Tensor, orientation: str, flatten: bool = False) -> Tensor:
    """The (out, in) matrix of a parameter (or of its gradient or momentum): ``oriented``, or
    for ``flatten`` an (out, in, *kernel) tensor viewed as (out, in * prod(kernel))."""
    if flatten and tensor.ndim != 2:
        return tensor.view(tensor.shape[0], -1)
    return oriented(tensor, orientation)


def matrix_shape(param_shape: tuple[int, ...], orientation: str, flatten: bool = False,
                 stacked: bool = False) -> tuple[int, int]:
    """The (d_out, d_in) of the matrix (of each expert's, ``stacked``) of a parameter stored
    as ``param_shape``."""
    if stacked and len(param_shape) == 3:
        param_shape = param_shape[1:]
    if flatten and len(param_shape) != 2:
        return (param_shape[0], math.prod(param_shape[1:]))
    return tuple(param_shape[::-1]) if orientation == "in_out" else tuple(param_shape)


class ExpertState(MutableMapping):
    """Expert ``expert`` of a stacked parameter's state, as a rule sees one matrix's: every
    entry but ``step`` is the expert's row of the parameter's (E, ...) tensor. An entry a rule
    creates (``energy_ref`` at the first gated step) is created for all E experts at once and
    stays missing, for the experts that have not written theirs yet, within that step."""

    def __init__(self, state: MutableMapping[str, Any], expert: int, experts: int,
                 fresh: dict[str, set[int]]) -> None:
        self.base, self.expert, self.experts = state, expert, experts
        self._fresh = fresh  # key -> experts whose row of a just-created entry is unwritten

    def _missing(self, key: str) -> bool:
        return key not in self.base or self.expert in self._fresh.get(key, ())

    def __getitem__(self, key: str) -> Any:
        if key == "step":
            return self.base["step"]
        if self._missing(key):
            raise KeyError(key)
        return local(self.base[key])[self.expert]

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "step":
            self.base["step"] = value
            return
        if key not in self.base:
            self.base[key] = torch.empty((self.experts, *value.shape), dtype=value.dtype,
                                         device=value.device)
            self._fresh[key] = set(range(self.experts))
        local(self.base[key])[self.expert].copy_(value)
        self._fresh.get(key, set()).discard(self.expert)

    def bind(self, key: str, rows: Tensor) -> None:
        """Make the parameter's entry ``rows`` (E rows of a program's stack, this expert's
        first): called for expert 0."""
        self.base[key] = rows
        self._fresh.pop(key, None)

    def __delitem__(self, key: str) -> None:
        del self.base[key]

    def __iter__(self) -> Iterator[str]:
        return (k for k in self.base if not self._missing(k) or k == "step")

    def __len__(self) -> int:
        return sum(1 for _ in self)


def local(tensor: Tensor) -> Tensor:
    """This rank's part of a DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class RuleState(MutableMapping):
    """A parameter's state as a rule sees it: DTensor entries as their local shard, per-element
    entries (``matrix_keys``) through the matrix view of the parameter (``.mT`` of an (in, out)
    matrix, the 2D view of a flattened weight). In-place updates land in the stored tensors;
    a new entry is stored as given (rules create only replicated entries)."""

    def __init__(self, state: MutableMapping[str, Any], matrix_keys: frozenset[str] = frozenset(),
                 orientation: str = "out_in", flatten: bool = False) -> None:
        self._state = state
        self._matrix_keys = matrix_keys
        self._view = (orientation, flatten)

    def __getitem__(self, key: str) -> Any:
        value = local(self._state[key])
        return matrix_view(value, *self._view) if key in self._matrix_keys else value

    def __setitem__(self, key: str, value: Any) -> None:
        old = self._state.get(key)
        if key in self._matrix_keys and old is not None:
            matrix_view(local(old), *self._view).copy_(value)
        elif isinstance(old, DTensor):
            local(old).copy_(value)
        else:
            self._state[key] = value

    def __delitem__(self, key: str) -> None:
        del self._state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


@dataclass(eq=False)
class Bucket:
    """Same-rule, same-shape parameters of one param group on one device (any shapes for
    AdamW): what one program runs."""

    rule: Rule
    backend: str
    group_index: int
    group: dict[str, Any]
    params: list[Tensor]
    labels: list[str]
    states: list[dict[str, Any]]
    device: torch.device
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    hyper: Callable[[], Mapping[str, Any]]  # the hyperparameters the rule reads, this step
    orientation: str = "out_in"
    flatten: bool = False  # (out, in, *kernel) parameters as (out, in * prod(kernel))
    experts: list[int] | None = None  # stacked: each member's expert (params repeat per expert)
    shape: tuple[int, ...] = ()  # matrices: the global (d_out, d_in) of the (out, in) matrix
    # Matrices whose Newton–Schulz involves other ranks: their layout over the exchange
    # group (trasmuon.layout) and this rank's place in it; None: this rank alone.
    layout: MatrixLayout | None = None
    process_group: Any = None
    group_rank: int = 0
    # An expert stack sharded inside its experts: every expert's layout (matrix e of the
    # exchange is expert e); member i is expert first_matrix + i. ``layout`` is then that of
    # this rank's first expert (the block it holds of each of its experts).
    stack_layouts: tuple[MatrixLayout, ...] = ()
    first_matrix: int = 0
    reductions: dict[str, Tensor] = field(default_factory=dict)  # name -> (B, n)
    program: Program | None = None
    exchange: Any = None  # the step's exchange that orthogonalizes this bucket (None: local)
    # Set by the stages each step.
    ns_input: Any = None
    ortho: Any = None
    ortho_row_sumsq: Any = None  # O's row sums of squares, when an exchange brought them
    momentum_wide: Any = None  # eager: the updated momenta in the compute dtype
    # With a bf16 momentum (the group's ``state_dtype``): each member's stochastic-rounding
    # key (``reference.sr_matrix_key`` of the group's seed, the parameter's index in the
    # optimizer and the expert), the same on every rank.
    sr_keys: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.params)

    @property
    def exchange_count(self) -> int:
        """How many matrices the bucket's exchange entry has: every expert of a stack sharded
        inside its experts (on every rank), else the bucket's own."""
        return len(self.stack_layouts) or self.count

    @property
    def state_dtype(self) -> torch.dtype:
        return ref.state_dtype(self.param_dtype)

    @property
    def momentum_dtype(self) -> torch.dtype:
        """What the rule's ``compact`` entries (the momentum) are stored in: the group's
        ``state_dtype``, else ``state_dtype``."""
        return entry_dtype(StateEntry("momentum", "param", compact=True), self.group, self.param_dtype)

    @property
    def block(self) -> Block:
        """This rank's rows and columns of each (out, in) matrix."""
        if self.layout is None:
            return Block((0, self.shape[0]), (0, self.shape[1]))
        return self.layout.blocks[self.group_rank]

    @property
    def sharded(self) -> bool:
        """Each rank holds a part of each matrix (FSDP2, HSDP, TP): the sums over rows are
        partial sums, all-reduced once per step."""
        return self.layout is not None and not self.layout.whole_everywhere

    @property
    def local_rows(self) -> int:
        return self.block.shape[0]

    @property
    def local_cols(self) -> int:
        return self.block.shape[1]

    @property
    def cols(self) -> slice:
        """This rank's columns, as a slice of a per-column vector of the whole matrix."""
        c0, c1 = self.block.cols
        return slice(c0, c1)

    def _member(self, i: int, t: Tensor) -> Tensor:
        t = local(t)
        if self.experts is not None:
            t = t[self.experts[i]]
        return matrix_view(t, self.orientation, self.flatten)

    def views(self) -> list[Tensor]:
        """This rank's (out, in) view of every parameter (of every expert, when stacked)."""
        return [self._member(i, p) for i, p in enumerate(self.params)]

    def grads(self) -> list[Tensor]:
        if (self.orientation == "out_in" and not self.flatten and self.experts is None
                and not isinstance(self.params[0], DTensor)):
            return [p.grad for p in self.params]  # the common case, at every step
        return [self._member(i, p.grad) for i, p in enumerate(self.params)]

    def rule_states(self) -> list[RuleState]:
        keys = frozenset(("momentum",)) if self.orientation == "in_out" or self.flatten else frozenset()
        return [RuleState(s, keys, self.orientation, self.flatten) for s in self.states]

    def steps(self) -> list[int]:
        """Each parameter's step t (eager backend: host counters)."""
        return [int(s["step"].item()) for s in self.states]


# --------------------------------------------------------------------------------------
# State creation
# --------------------------------------------------------------------------------------
def _extent_shape(entry: StateEntry, bucket: Bucket, param: Tensor) -> tuple[int, ...]:
    if entry.extent == "param":
        return tuple(param.shape)
    if entry.extent == "rows":
        return (bucket.shape[0],)
    if entry.extent == "cols":
        return (bucket.shape[1],)
    return ()


def _oriented_shape(rule: Rule, param_shape: tuple[int, ...], group: Mapping[str, Any]) -> tuple[int, ...]:
    """The (out, in) shape a matrix rule sees for a parameter stored as ``param_shape``."""
    if not rule.matrix or len(param_shape) < 2:
        return param_shape
    return matrix_shape(param_shape, group.get("orientation", "out_in"), group.get("flatten", False),
                        group.get("stacked", False))


def state_entries_for(rule: Rule, group: Mapping[str, Any], param_shape: tuple[int, ...]
                      ) -> tuple[StateEntry, ...]:
    """The state entries ``rule`` keeps for a parameter stored as ``param_shape`` in
    ``group`` (its orientation and flatten keys)."""
    return tuple(rule.state_entries(group, _oriented_shape(rule, param_shape, group)))


def state_shapes(rule: Rule, group: Mapping[str, Any], param_shape: tuple[int, ...]
                 ) -> dict[str, tuple[int, ...]]:
    """The shape of every state tensor ``rule`` keeps for a parameter stored as
    ``param_shape`` in ``group`` (``step`` included)."""
    shape = _oriented_shape(rule, param_shape, group)
    # A stacked parameter keeps every per-matrix entry per expert: a leading dim of E.
    experts = (param_shape[0],) if rule.matrix and group.get("stacked") and len(param_shape) == 3 else ()
    shapes: dict[str, tuple[int, ...]] = {"step": ()}
    for entry in state_entries_for(rule, group, param_shape):
        if entry.extent == "param":
            shapes[entry.name] = tuple(param_shape)
        elif entry.extent == "rows":
            shapes[entry.name] = (*experts, shape[0])
        elif entry.extent == "cols":
            shapes[entry.name] = (*experts, shape[1])
        else:
            shapes[entry.name] = experts
    return shapes


def vector_placements(placements: tuple, dims: Mapping[int, int]) -> list:
    """The placements of a tensor whose dim ``dims[d]`` follows dim d of a tensor with
    ``placements``: the shards of those dims (as shards of the new dims), Replicate for every
    other."""
    from torch.distributed.tensor import Replicate, Shard

    out = []
    for placement in placements:
        dim = getattr(placement, "dim", None)
        if dim in dims and type(placement).__name__ == "_StridedShard":
            out.append(type(placement)(dims[dim], split_factor=placement.split_factor))
        elif dim in dims and isinstance(placement, Shard):
            out.append(Shard(dims[dim]))
        else:
            out.append(Replicate())
    return out


def dim_placements(placements: tuple, dim: int) -> list:
    """The placements of a vector along dim ``dim`` of a tensor with ``placements``."""
    return vector_placements(placements, {dim: 0})


def entry_dtype(entry: StateEntry, group: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
    """The dtype a state entry is kept in: the group's ``state_dtype`` for a ``compact``
    entry (a matrix rule's momentum) when the group sets one, else ``reference.state_dtype``."""
    if entry.compact:
        return ref.momentum_dtype(group.get("state_dtype"), param_dtype)
    return ref.state_dtype(param_dtype)


def convert_compact_state(state: MutableMapping[str, Any], entries: tuple[StateEntry, ...],
                          group: Mapping[str, Any], param_dtype: torch.dtype) -> None:
    """Existing ``compact`` entries of another dtype than the group's (the group's
    ``state_dtype`` changed) converted by ``reference.convert_state``: never reset."""
    for entry in entries:
        value = state.get(entry.name) if entry.compact else None
        if isinstance(value, Tensor):
            dtype = entry_dtype(entry, group, param_dtype)
            if value.dtype != dtype:
                state[entry.name] = ref.convert_state(value, dtype)


def init_state(bucket: Bucket) -> None:
    """Create the missing (non-lazy) state of every parameter of ``bucket``: float32 (float64
    for float64 params; a matrix rule's momentum in the group's ``state_dtype`` when it sets
    one, an existing momentum of another dtype converted to it); per-row state of a DTensor
    matrix as a DTensor sharded as the rows are; per-column and per-matrix state replicated
    and whole (every rank updates all of it from the all-reduced sums over rows)."""
    sdt = bucket.state_dtype
    entries = bucket.rule.state_entries(bucket.group, bucket.shape)
    for p, state in zip(bucket.params, bucket.states, strict=True):
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if isinstance(state, ExpertState):
            if state.expert == 0:  # the first expert's member creates the whole stack's
                convert_compact_state(state.base, entries, bucket.group, bucket.param_dtype)
                _init_stacked(bucket, p, state.base, entries, sdt)
            continue
        convert_compact_state(state, entries, bucket.group, bucket.param_dtype)
        for entry in entries:
            if entry.lazy or entry.name in state:
                continue
            if entry.extent == "param":
                value = torch.full_like(p, entry.fill, dtype=entry_dtype(entry, bucket.group, p.dtype),
                                        memory_format=torch.preserve_format)
            elif entry.extent == "rows" and isinstance(p, DTensor):
                # Sharded as the matrix's rows are (the parameter's placements on its row dim).
                row_dim = 1 if bucket.orientation == "in_out" else 0
                value = DTensor.from_local(
                    torch.full((bucket.local_rows,), entry.fill, dtype=sdt, device=bucket.device),
                    p.device_mesh, dim_placements(p.placements, row_dim), run_check=False,
                    shape=(bucket.shape[0],), stride=(1,),
                )
            else:
                value = torch.full(_extent_shape(entry, bucket, p), entry.fill, dtype=sdt,
                                   device=bucket.device)
            state[entry.name] = value


def _init_stacked(bucket: Bucket, p: Tensor, state: MutableMapping[str, Any],
                  entries: tuple[StateEntry, ...], sdt: torch.dtype) -> None:
    """The missing state of a stacked (E, ...) parameter: per-element entries like it, every
    other entry with a leading dim of E (a DTensor sharded over experts as the parameter is)."""
    experts = p.shape[0]
    for entry in entries:
        if entry.lazy or entry.name in state:
            continue
        if entry.extent == "param":
            state[entry.name] = torch.full_like(p, entry.fill,
                                                dtype=entry_dtype(entry, bucket.group, p.dtype),
                                                memory_format=torch.preserve_format)
            continue
        tail = _extent_shape(entry, bucket, p)
        if isinstance(p, DTensor):
            # Sharded over experts as the stack is, and per-row entries over rows as its rows
            # are; whole (replicated) along everything else.
            dims = {0: 0}
            local_tail = tail
            if entry.extent == "rows":
                dims[2 if bucket.orientation == "in_out" else 1] = 1
                local_tail = (bucket.local_rows,)
            state[entry.name] = DTensor.from_local(
                torch.full((local(p).shape[0], *local_tail), entry.fill, dtype=sdt, device=bucket.device),
                p.device_mesh, vector_placements(p.placements, dims), run_check=False,
                shape=(experts, *tail), stride=torch.empty(experts, *tail, device="meta").stride())
        else:
            state[entry.name] = torch.full((experts, *tail), entry.fill, dtype=sdt, device=bucket.device)


# --------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------
def _frozen(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def fingerprint(groups: list[dict[str, Any]]) -> tuple:
    """What a plan depends on: per group its hyperparameters (lr excepted: it is read every
    step) and, per param with a gradient, its identity, shape, dtypes, device, layout and
    strides (and alignment). Two steps with equal fingerprints run the same plan.

    This runs at every step, so it is written for speed: one flat tuple, no per-key sorting
    (a group's keys keep their order), tensors compared by identity."""
    parts: list[Any] = []
    for gi, group in enumerate(groups):
        parts.append((gi, id(group), tuple(
            (k, _frozen(v)) for k, v in group.items() if k not in _NOT_PLANNED)))
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if type(g) is Tensor and g.layout == torch.strided:
                # The layout of the gradient, and whether it is 16-byte aligned (the Triton
                # programs' vectorized loads assume what the plan saw).
                parts.append((id(p), p.dtype, p.shape, g.dtype, g.shape, g.stride(), g.device,
                              g.data_ptr() % 16 == 0))
            else:  # a DTensor or a sparse gradient: the slower, general description
                gl = g.to_local() if isinstance(g, DTensor) else g
                strided = g.layout == torch.strided
                parts.append((id(p), p.dtype, p.shape, g.dtype, g.shape, g.layout,
                              gl.stride() if strided else None, gl.device,
                              strided and gl.data_ptr() % 16 == 0, type(g)))
    return tuple(parts)


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------
class StepPlan:
    """Buckets of one step, their programs, and the per-device buffers they share."""

    def __init__(self, key: tuple, adamw: list[Bucket], matrices: list[Bucket]) -> None:
        self.key = key
        self.adamw = adamw
        self.matrices = matrices
        self.devices = _DeviceScalars()
        self.reduce_buffers: dict[tuple[torch.device, torch.dtype, int], Tensor] = {}
        self.reduce_masks: dict[tuple[torch.device, torch.dtype, int], Tensor] = {}
        self.exchanges: list[Any] = []  # trasmuon.distributed.StepExchange, one per group

    @property
    def buckets(self) -> list[Bucket]:
        return [*self.adamw, *self.matrices]

    def allocate_reductions(self) -> None:
        """One flat buffer per (device, dtype) for the sums over rows of matrices this rank
        holds whole, and one per (device, dtype, process group) for those of sharded matrices
        (all-reduced once per step); every bucket's ``reductions`` are (B, n) views into
        them. A sharded buffer has a mask of the entries this rank contributes: its own
        columns of a per-column sum, a per-row quantity's sum when it holds the first columns
        of its rows, and only if it is its block's first holder (a replica's copy counts
        zero)."""
        sizes: dict[tuple, int] = {}
        layout: list[tuple[Bucket, str, int, tuple]] = []
        for b in self.matrices:
            assert isinstance(b.rule, MatrixRule)
            for name, n in b.rule.reductions(b.group, b.shape).items():
                key = (b.device, b.state_dtype, id(b.process_group)) if b.sharded else (b.device, b.state_dtype)
                layout.append((b, name, n, key))
                sizes[key] = sizes.get(key, 0) + b.exchange_count * n
        buffers = {key: torch.zeros(size, dtype=key[1], device=key[0]) for key, size in sizes.items()}
        masks = {key: torch.zeros(size, dtype=torch.bool) for key, size in sizes.items() if len(key) == 3}
        offsets = dict.fromkeys(sizes, 0)
        for b, name, n, key in layout:
            # (a stack sharded inside its experts holds E rows, its own experts' at theirs)
            offsets[key] += b.exchange_count * n
            start = offsets[key] - (b.exchange_count - b.first_matrix) * n
            b.reductions[name] = buffers[key][start:start + b.count * n].view(b.count, n)
            if key in masks and b.layout.primary[b.group_rank]:
                mask = masks[key][start:start + b.count * n].view(b.count, n)
                if n == b.shape[1]:  # per column: this rank's columns
                    mask[:, b.cols] = True
                elif b.block.cols[0] == 0:  # a sum of whole rows' quantities: once per row
                    mask[:] = True
        # The replicated buffers live on through the views; the sharded ones are all-reduced.
        self.reduce_buffers = {key: buf for key, buf in buffers.items() if len(key) == 3}
        # Stored inverted: what reduce_rows zeroes before the all-reduce.
        self.reduce_masks = {key: (~mask).to(key[0]) for key, mask in masks.items()}

    def sharded_reductions(self) -> list[tuple[Any, Tensor, Tensor]]:
        """(process group, buffer, entries to zero first) of every buffer that must be
        all-reduced this step."""
        groups = {id(b.process_group): b.process_group for b in self.matrices if b.sharded}
        return [(groups[key[2]], buf, self.reduce_masks[key]) for key, buf in self.reduce_buffers.items()]

    def begin(self, lrs_staged: bool = False) -> None:
        """Advance the step counters and publish this step's lr values and gradients
        (``lrs_staged``: the float lrs were already copied, by ``devices.stage_lrs()`` outside
        the graph being captured)."""
        check_capture(self, lrs_staged)
        for b in self.buckets:
            if b.backend == "eager":
                # One counter per parameter: a stack's experts share theirs.
                for s in {id(s): s for s in (getattr(s, "base", s) for s in b.states)}.values():
                    s["step"] += 1
        self.devices.begin(lrs_staged)
        for b in self.buckets:
            refresh = getattr(b.program, "begin", None)
            if refresh is not None:
                refresh()

    def end(self) -> None:
        for b in self.buckets:
            done = getattr(b.program, "end", None)
            if done is not None:
                done()


_SLOT_ALIGN = 4  # float32 scalars: 16 bytes


def _aligned_slot(index: int) -> int:
    return -(-index // _SLOT_ALIGN) * _SLOT_ALIGN


class _DeviceScalars:
    """Device-resident scalars of the Triton programs: per device one float32 tensor of lr
    slots (one per param group) and one of step counters (one per parameter).

    ``begin`` writes the lr values of float-lr groups into a fixed host staging buffer and
    copies it to the device (so the copy's arguments never change; the copy of the previous
    step must have finished reading the buffer, which an event checks), copies tensor lrs on
    the device, and advances every counter with one add."""

    def __init__(self) -> None:
        self._slots: dict[torch.device, dict[int, dict[str, Any]]] = {}
        self.lr: dict[torch.device, Tensor] = {}
        self._staging: dict[torch.device, Tensor] = {}
        self._events: dict[torch.device, Any] = {}
        self._counter_users: dict[torch.device, list[tuple[int, list[dict[str, Any]]]]] = {}
        self.counters: dict[torch.device, Tensor] = {}
        self.launches: dict[torch.device, list[Any]] = {}

    def lr_slot(self, device: torch.device, group_index: int, group: dict[str, Any]) -> int:
        """The index of ``group``'s lr slot on ``device`` (reserved on first use)."""
        slots = self._slots.setdefault(device, {})
        slots.setdefault(group_index, group)
        return list(slots).index(group_index)

    def reserve_counters(self, device: torch.device, states: list[dict[str, Any]]) -> int:
        """Reserve consecutive step counters for ``states``; returns the first index (a
        multiple of ``_SLOT_ALIGN``: every bucket's view starts 16-byte aligned)."""
        users = self._counter_users.setdefault(device, [])
        start = _aligned_slot(users[-1][0] + len(users[-1][1])) if users else 0
        users.append((start, states))
        return start

    def allocate(self) -> None:
        """Allocate the device tensors once every program has reserved its slots, and move
        each parameter's ``step`` into its counter (the state entry becomes a 0-d view)."""
        for device, slots in self._slots.items():
            # One lr per _SLOT_ALIGN floats: every slot's address is 16-byte aligned, as the
            # kernels' pointer arguments are everywhere else (one specialization per kernel).
            lr = self.lr[device] = torch.zeros(len(slots) * _SLOT_ALIGN, dtype=torch.float32, device=device)
            staging = self._staging[device] = torch.zeros(
                len(slots), dtype=torch.float32, pin_memory=device.type == "cuda")
            lr_slots = lr.view(len(slots), _SLOT_ALIGN)[:, 0]
            self.launches.setdefault(device, []).append(TorchLaunch(
                "copy(lr)", lambda d=lr_slots, staging=staging: d.copy_(staging, non_blocking=True),
                (lr, staging)))
        for device, users in self._counter_users.items():
            start, states = users[-1]
            values = [0.0] * (start + len(states))
            for start, states in users:
                for i, s in enumerate(states):
                    values[start + i] = float(s["step"]) if "step" in s else 0.0
            counters = self.counters[device] = torch.tensor(values, dtype=torch.float32).to(device)
            for start, states in users:
                for i, s in enumerate(states):
                    s["step"] = counters[start + i]
            self.launches.setdefault(device, []).append(TorchLaunch(
                "add(step)", lambda c=counters: c.add_(1.0), (counters,)))

    def lr_tensor(self, device: torch.device, slot: int) -> Tensor:
        return self.lr[device][slot * _SLOT_ALIGN]

    def counter_view(self, device: torch.device, start: int, count: int) -> Tensor:
        return self.counters[device][start:start + count]

    def stage_lrs(self) -> None:
        """Write the float lrs into each device's pinned staging buffer and copy it to the
        device: every step's, and before each replay of a captured step (the copy stays
        outside the graph)."""
        for device in self._staging:
            self._stage(device)

    def _stage(self, device: torch.device) -> None:
        event = self._events.get(device)
        if event is not None and not event.query():
            event.synchronize()  # the last copy has not read the staging buffer yet
        values = self._staging[device].numpy()
        for slot, group in enumerate(self._slots[device].values()):
            if not isinstance(group["lr"], Tensor):
                values[slot] = group["lr"]
        for launch in self.launches[device]:
            if launch.name == "copy(lr)":
                launch()
        if device.type == "cuda":
            event = self._events.setdefault(device, torch.cuda.Event())
            event.record()

    def begin(self, lrs_staged: bool = False) -> None:
        for device, launches in self.launches.items():
            # Under CUDA graph capture the staging copy and its event stay out of the graph:
            # every lr is a tensor (check_capture), or the caller staged them (cuda_graph=True).
            if device in self._staging and not lrs_staged and not capturing(device):
                self._stage(device)
            for launch in launches:
                if launch.name != "copy(lr)":
                    launch()
            for slot, group in enumerate(self._slots.get(device, {}).values()):
                lr = group["lr"]
                if isinstance(lr, Tensor):  # copied on the device: never read on the host
                    dst = self.lr[device][slot * _SLOT_ALIGN:slot * _SLOT_ALIGN + 1]
                    TorchLaunch("copy(tensor lr)",
                                lambda d=dst, v=lr: d.copy_(v.detach().reshape(1), non_blocking=True),
                                (dst, lr))()


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_capture(plan: StepPlan, lrs_staged: bool = False) -> None:
    """What a step captured in a CUDA graph must not do, refused while capturing: run an eager
    bucket (its host-side step counts and syncs), or read a float lr (it would be frozen at
    its value when captured) unless the caller copies the float lrs before every replay
    (``lrs_staged``: cuda_graph=True). See docs/architecture.md, "Capturing the step"."""
    devices = {b.device for b in plan.buckets}
    if not any(capturing(d) for d in devices):
        return
    eager = [b for b in plan.buckets if b.backend == "eager"]
    if eager:
        raise RuntimeError(
            f"capturing opt.step() in a CUDA graph needs every parameter on the Triton backend; "
            f"{eager[0].labels[0]} runs eager (backend={eager[0].backend!r})")
    for b in plan.buckets:
        if not lrs_staged and not isinstance(b.group["lr"], Tensor):
            raise RuntimeError(
                "capturing opt.step() in a CUDA graph needs tensor lrs on the device (a float lr "
                f"would be frozen at its value when captured): param group {b.group_index} has "
                f"lr={b.group['lr']!r}; pass lr=torch.tensor(..., device='cuda')")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def split_counts(count: int, world: int, loads: list[float], cost: float) -> list[tuple[int, int]]:
    """Contiguous ranges of ``count`` matrices for ``world`` ranks, sizes as even as possible,
    the larger ones to the ranks with the smallest ``loads`` so far (updated in place by
    ``cost`` per matrix). Deterministic: every rank computes the same split."""
    base, extra = divmod(count, world)
    order = sorted(range(world), key=lambda r: (loads[r], r))
    sizes = [base] * world
    for r in order[:extra]:
        sizes[r] += 1
    ranges, start = [], 0
    for r in range(world):
        ranges.append((start, start + sizes[r]))
        start += sizes[r]
        loads[r] += sizes[r] * cost
    return ranges


__all__ = [
    "BACKENDS",
    "ORIENTATIONS",
    "Bucket",
    "ExpertState",
    "RuleState",
    "StepPlan",
    "ceil_div",
    "convert_compact_state",
    "dim_placements",
    "entry_dtype",
    "fingerprint",
    "init_state",
    "local",
    "matrix_shape",
    "matrix_view",
    "oriented",
    "split_counts",
    "state_entries_for",
    "state_shapes",
]

