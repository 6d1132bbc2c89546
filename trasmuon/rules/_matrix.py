"""What the matrix rules share: their common hyperparameters, the eager momentum stage, and
the device pointer tables of their Triton programs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import reference as ref
from ..layout import Block, block_view, row_sums_view
from . import Hyperparameter, Program
from ._checks import (
    in_range,
    int_at_least,
    is_bool,
    one_of,
    valid_betas,
    valid_lr,
    valid_ns_blocks,
    valid_ns_coefficients,
    valid_ns_restarts,
)

if TYPE_CHECKING:
    from ..plan import Bucket

# How a 2D parameter stores its matrix: "out_in" is nn.Linear's (out_features, in_features),
# "in_out" is transformers' Conv1D (in_features, out_features). The matrix rules always act
# on the (out, in) matrix: rows are output features, columns input features.
ORIENTATIONS = ("out_in", "in_out")


def lr(default: float) -> Hyperparameter:
    return Hyperparameter("lr", default, valid_lr, "a finite float >= 0 or a one-element tensor")


def betas(default: tuple[float, float]) -> Hyperparameter:
    return Hyperparameter("betas", default, valid_betas, "a pair (beta1, beta2) with each in [0, 1)")


def eps(default: float) -> Hyperparameter:
    return Hyperparameter("eps", default, in_range(0.0, math.inf, lo_open=True), "a finite float > 0")


def weight_decay(default: float) -> Hyperparameter:
    return Hyperparameter("weight_decay", default, in_range(0.0, math.inf), "a finite float >= 0")


def nesterov(default: bool) -> Hyperparameter:
    return Hyperparameter("nesterov", default, is_bool, "a bool")


def ns_coefficients(default: Any) -> Hyperparameter:
    return Hyperparameter("ns_coefficients", default, valid_ns_coefficients,
                          "one (a, b, c) triple or a sequence of them")


NS_STEPS = Hyperparameter("ns_steps", 5, lambda v: int_at_least(1)(v) and v <= 100, "an int in [1, 100]")
NS_DTYPE = Hyperparameter("ns_dtype", torch.bfloat16, one_of(ref.NS_DTYPES), f"one of {ref.NS_DTYPES}")
# Newton–Schulz in its Gram form (docs/rule.md, "Gram Newton–Schulz"): "standard" (the papers'
# iteration, the default), "gram" (the Gram form where it takes fewer FLOPs: the long side
# beyond about twice the short one, ``reference.uses_gram``), "gram-always" (every shape).
NS_METHOD = Hyperparameter("ns_method", "standard", one_of(ref.NS_METHODS), f"one of {ref.NS_METHODS}")
# The steps after which the Gram form recomputes R = X X^T (those >= ns_steps are ignored).
NS_RESTARTS = Hyperparameter("ns_restarts", ref.DEFAULT_NS_RESTARTS, valid_ns_restarts,
                             "a tuple of distinct ints >= 1 (the steps after which the Gram form "
                             "restarts; () for none)")
# Per-head (block) Newton–Schulz (docs/rule.md, "Per-head orthogonalization"): the (d_out,
# d_in) matrix (in the rule's orientation) is orthogonalized as a (row_blocks, col_blocks) grid
# of equal blocks, each a matrix of its own; everything else in the rule sees the whole O.
# Both counts must divide their side of every matrix of the group (``ns_blocks_problem``,
# checked when a group is added and before every step that plans anew).
NS_BLOCKS = Hyperparameter("ns_blocks", ref.DEFAULT_NS_BLOCKS, valid_ns_blocks,
                           "a pair (row_blocks, col_blocks) of ints >= 1 (each dividing its "
                           "side of every (d_out, d_in) matrix of the group)", per_group=True)
# The update RMS per unit lr (TrasMuon, NorMuon, NAMO). Bounded above so that the step size
# scale * lr * sqrt(d_out d_in) / ||O_base||_F stays far inside float32's range.
SCALE_MAX = 1000.0
SCALE = Hyperparameter("scale", 0.2, in_range(0.0, SCALE_MAX, lo_open=True),
                       f"a finite float in (0, {SCALE_MAX:g}]")
ORIENTATION = Hyperparameter("orientation", "out_in", one_of(ORIENTATIONS), f"one of {ORIENTATIONS}",
                             per_group=True)
# A weight of more than two dims, (out, in, *kernel) as convolutions store theirs, is the
# (out, in * prod(kernel)) matrix (Dion's convention for conv weights).
FLATTEN = Hyperparameter("flatten", False, is_bool, "a bool", per_group=True)
# An (E, out, in) weight (or (E, in, out) with orientation="in_out") is E independent matrices,
# as MoE layers stack their experts; every per-matrix quantity is kept per expert.
STACKED = Hyperparameter("stacked", False, is_bool, "a bool", per_group=True)
# Memory-lean state (docs/usage.md, "state_dtype"): None keeps the momentum in
# ``reference.state_dtype(param.dtype)``; torch.bfloat16 stores it in bf16, rounded
# stochastically from the float32 update with random bits from ``seed`` (an int >= 0; None:
# the optimizer's, from torch.initial_seed() at construction, written into the group once it
# stores bf16). Every other state entry stays float32.
STATE_DTYPE = Hyperparameter("state_dtype", None, one_of(ref.STATE_DTYPES),
                             f"one of {ref.STATE_DTYPES}")
SEED = Hyperparameter("seed", None, lambda v: v is None or (int_at_least(0)(v) and v < 2**64),
                      "None or an int in [0, 2**64)")


# --------------------------------------------------------------------------------------
# Eager pieces
# --------------------------------------------------------------------------------------
def eager_lr(bucket: Bucket) -> float | Tensor:
    """The group's lr as the eager reference takes it: a float, or a 0-d tensor on the
    bucket's device in the state dtype."""
    value = bucket.group["lr"]
    if isinstance(value, Tensor):
        return value.detach().reshape(()).to(device=bucket.device, dtype=bucket.state_dtype)
    return float(value)


def gram_restarts(group: Mapping[str, Any], shape: Sequence[int]) -> tuple[int, ...] | None:
    """The restarts of the Gram form when the group's ``ns_method`` takes it for a (d_out,
    d_in) ``shape`` (the whole matrix's), None for the standard iteration."""
    restarts = tuple(group["ns_restarts"])
    if ref.uses_gram(group["ns_method"], shape, group["ns_steps"], restarts):
        return restarts
    return None


def ns_blocks(group: Mapping[str, Any]) -> tuple[int, int]:
    """The group's ``ns_blocks`` as a tuple ((1, 1) for a group without the key)."""
    rb, cb = group.get("ns_blocks", ref.DEFAULT_NS_BLOCKS)
    return int(rb), int(cb)


def ns_blocks_problem(group: Mapping[str, Any], shape: Sequence[int]) -> str | None:
    """What is wrong with the group's ``ns_blocks`` for a (d_out, d_in) matrix (None: nothing)."""
    return ref.ns_blocks_problem(ns_blocks(group), shape)


def eager_newton_schulz(bucket: Bucket, x: Tensor) -> Tensor:
    """The eager Newton–Schulz of one of the bucket's inputs, a whole (d_out, d_in) matrix
    (docs/rule.md step 3), with the rule's schedule and eps, in the form the group's
    ``ns_method`` picks for the shape it iterates on: the whole matrix, or with ``ns_blocks``
    each block (``reference.blocked_newton_schulz``: the blocks as one batch, O assembled)."""
    rule, g = bucket.rule, bucket.group
    blocks = ns_blocks(g)
    shape = ref.ns_block_shape(x.shape, blocks)
    restarts = gram_restarts(g, shape)
    if restarts is not None:
        def ns(t: Tensor) -> Tensor:
            return ref.gram_newton_schulz(t, rule.ns_schedule(g), rule.ns_eps(g), g["ns_dtype"],
                                          restarts=restarts)
    else:
        def ns(t: Tensor) -> Tensor:
            return ref.newton_schulz(t, rule.ns_schedule(g), rule.ns_eps(g), g["ns_dtype"])
    return ref.blocked_newton_schulz(x, blocks, ns)


class EagerMatrixProgram(Program):
    """The eager program of a matrix rule: the subclass's ``prepare`` and ``finish`` around
    Newton–Schulz of every input (run here, or by a distributed exchange through the hooks
    below), with ``post`` for what needs O (nothing by default)."""

    bucket: Bucket

    def orthogonalize(self) -> None:
        b = self.bucket
        b.ortho = [eager_newton_schulz(b, x) for x in b.ns_input]
        b.ortho_row_sumsq = None

    def post(self) -> None:
        pass

    # The distributed exchange's hooks (trasmuon.distributed.StepExchange) ----------------
    @property
    def exchange_dtype(self) -> torch.dtype:
        """What Newton–Schulz's input and output travel as: its own dtype."""
        return self.bucket.group["ns_dtype"]

    @property
    def row_sums_dtype(self) -> torch.dtype:
        return self.bucket.state_dtype

    def _transposed(self) -> bool:
        # A tall matrix's O is the transpose of a contiguous (d_in, d_out) tensor (Newton–
        # Schulz iterates on X^T): its blocks travel and arrive in that layout, so that sums
        # over O round as in one process. A blocked O is assembled contiguous.
        b = self.bucket
        return b.shape[0] > b.shape[1] and ns_blocks(b.group) == ref.DEFAULT_NS_BLOCKS

    def pack_input(self, i: int, out: Tensor) -> None:
        """This rank's block of matrix ``i``'s Newton–Schulz input into ``out`` (bytes)."""
        x = self.bucket.ns_input[i]
        block_view(out, self.exchange_dtype, tuple(x.shape)).copy_(x)

    def owner_stage(self, count: int) -> EagerOwner:
        """Newton–Schulz of the ``count`` whole matrices this rank owns."""
        return EagerOwner(self, count)

    def unpack_output(self, i: int, data: Tensor) -> None:
        """This rank's block of matrix ``i``'s O (and its rows' sums of squares) from bytes."""
        b = self.bucket
        shape = b.block.shape
        o = block_view(data, self.exchange_dtype, shape, self._transposed()).clone()
        sums = None
        if b.rule.needs_row_sumsq:
            sums = row_sums_view(data, self.exchange_dtype, shape, self.row_sums_dtype).clone()
        self.__dict__.setdefault("_received", {})[i] = (o, sums)

    def outputs_received(self) -> None:
        b = self.bucket
        received = self.__dict__.pop("_received", {})
        shape = b.block.shape
        empty = (torch.empty(shape, dtype=self.exchange_dtype, device=b.device),  # no rows here
                 torch.empty(shape[0], dtype=self.row_sums_dtype, device=b.device))
        pairs = [received.get(i, empty) for i in range(b.count)]
        b.ortho = [o for o, _ in pairs]
        b.ortho_row_sumsq = [s for _, s in pairs] if b.rule.needs_row_sumsq else None


class EagerOwner:
    """The whole matrices a rank owns in an exchange: inputs assembled from their blocks,
    Newton–Schulz, O's blocks (and O's row sums of squares, in the state dtype, when the rule
    needs them) out."""

    def __init__(self, program: EagerMatrixProgram, count: int) -> None:
        b = program.bucket
        self.program, self.bucket = program, b
        self.x = torch.empty(count, *b.shape, dtype=program.exchange_dtype, device=b.device)
        self.o: list[Tensor] = []
        self.row_sums: list[Tensor] = []

    def unpack_input(self, k: int, block: Block, data: Tensor) -> None:
        (r0, r1), (c0, c1) = block.rows, block.cols
        self.x[k, r0:r1, c0:c1].copy_(block_view(data, self.program.exchange_dtype, block.shape))

    def run(self) -> None:
        b = self.bucket
        self.o = [eager_newton_schulz(b, x) for x in self.x]
        if b.rule.needs_row_sumsq:
            self.row_sums = [ref.row_sumsq(o, b.state_dtype) for o in self.o]

    def pack_output(self, k: int, block: Block, out: Tensor) -> None:
        (r0, r1), (c0, c1) = block.rows, block.cols
        p = self.program
        block_view(out, p.exchange_dtype, block.shape, p._transposed()).copy_(self.o[k][r0:r1, c0:c1])
        if self.bucket.rule.needs_row_sumsq:
            row_sums_view(out, p.exchange_dtype, block.shape, p.row_sums_dtype).copy_(self.row_sums[k][r0:r1])


def eager_momentum(bucket: Bucket, beta1: float, nesterov_: bool) -> list[Tensor]:
    """The momentum stage of every matrix (docs/rule.md step 2): updates the momenta and
    sets ``bucket.ns_input`` and ``bucket.momentum_wide`` (the updated momenta in the compute
    dtype: the state tensors themselves unless they are bf16); returns the gradients in the
    compute dtype. A bf16 momentum is stored with stochastic rounding keyed by the matrix
    (``bucket.sr_keys``), its step and its elements' places in the whole matrix."""
    wide, inputs, momenta = [], [], []
    rounding = [None] * bucket.count
    if bucket.momentum_dtype == torch.bfloat16:
        (r0, _), (c0, _) = bucket.block.rows, bucket.block.cols
        rounding = [ref.StochasticRounding(key, step, row0=r0, col0=c0, d_in=bucket.shape[1])
                    for key, step in zip(bucket.sr_keys, bucket.steps(), strict=True)]
    for grad, state, sr in zip(bucket.grads(), bucket.rule_states(), rounding, strict=True):
        ns_in, grad_wide, momentum = ref.momentum_stage_(grad, state, beta1, nesterov_, sr)
        inputs.append(ns_in)
        wide.append(grad_wide)
        momenta.append(momentum)
    bucket.ns_input = inputs
    bucket.momentum_wide = momenta
    return wide


# --------------------------------------------------------------------------------------
# Triton pieces
# --------------------------------------------------------------------------------------
def refuse_moved_grads_while_capturing(grad: Tensor) -> None:
    """Called when a bucket's gradients moved: a captured graph would keep reading the old
    addresses, so rewriting a pointer table is refused while capturing."""
    if grad.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "gradients moved while capturing opt.step() in a CUDA graph: a replay would read "
            "them where they were; keep them in place (zero_grad(set_to_none=False)) and "
            "take one uncaptured step after they moved")


class PointerTable:
    """A kernel argument for a list of same-layout tensors: a device table of their
    addresses (``trasmuon_kernels._common.TensorBucket``) whose entries can be rewritten in
    place when the tensors move (gradients), so prepared launches keep their arguments."""

    def __init__(self, tensors: Sequence[Tensor], *, stand_in: bool = False) -> None:
        from trasmuon_kernels._common import TensorBucket

        first = tensors[0]
        self.bucket = TensorBucket.of(list(tensors))
        if stand_in:
            # The launch passes ``base`` only for its element type: point it at a small
            # buffer of ours so that no stale gradient is kept alive by the launch.
            base = torch.empty(16, dtype=first.dtype, device=first.device).as_strided(
                first.shape, (0, 0))
            self.bucket = type(self.bucket)(
                base=base, table=self.bucket.table, count=self.bucket.count, shape=self.bucket.shape,
                strides=self.bucket.strides, aligned=self.bucket.aligned, tensors=None)
        self.ptrs = tuple(t.data_ptr() for t in tensors)

    def refresh(self, tensors: Sequence[Tensor]) -> None:
        """Write the new addresses into the table (same layout and alignment: the plan's
        fingerprint covers those)."""
        from trasmuon_kernels._launch import TorchLaunch

        ptrs = tuple(t.data_ptr() for t in tensors)
        if ptrs == self.ptrs:
            return
        refuse_moved_grads_while_capturing(tensors[0])
        host = torch.tensor(ptrs, dtype=torch.int64)
        table = self.bucket.table
        if table.is_cuda:
            host = host.pin_memory()  # a non-blocking copy from pinned memory: no host sync
        TorchLaunch("copy(pointer table)", lambda: table.copy_(host, non_blocking=True),
                    (table, host))()
        self.ptrs = ptrs
