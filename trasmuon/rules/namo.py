"""NAMO (arXiv 2602.17080): orthogonalized momentum scaled by one Adam-style adaptive step per
matrix (docs/rule.md, "NAMO and NAMO-D").

Stages of a bucket (see :mod:`trasmuon.rules`):

* ``prepare``: ||G||_F^2 of the raw gradient, the momentum and the Nesterov input N, and
  ||N||_F^2, both as sums over rows (all-reduced for sharded matrices);
* ``orthogonalize``: Newton–Schulz of N with Muon's triple, normalized by ||X||_F + 1e-7;
* ``finish``: the second moment v, alpha, the decay and the update.

Eager: ``reference.namo_update_stage_`` matrix by matrix. Triton:
:mod:`trasmuon.rules._triton_namo`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import reference as ref
from . import Hyperparameter, MatrixRule, Program, StateEntry, register
from . import _matrix as M
from ._checks import one_of
from ._diagnostics import namo_diagnostics

if TYPE_CHECKING:
    from ..plan import Bucket, StepPlan

WEIGHT_DECAY_MODE = Hyperparameter("weight_decay_mode", "adaptive", one_of(ref.WEIGHT_DECAY_MODES),
                                   f"one of {ref.WEIGHT_DECAY_MODES}")
HYPERPARAMETERS = (
    M.lr(1e-2), M.betas((0.95, 0.99)), M.eps(1e-8), M.weight_decay(0.1), M.nesterov(True),
    M.ns_coefficients(ref.MUON_NS_COEFFICIENTS), M.NS_STEPS, M.NS_DTYPE, M.NS_METHOD,
    M.NS_RESTARTS, M.NS_BLOCKS, M.SCALE, WEIGHT_DECAY_MODE, M.ORIENTATION, M.FLATTEN, M.STACKED,
    M.STATE_DTYPE, M.SEED,
)


class NAMORule(MatrixRule):
    name = "namo"
    hyperparameters = HYPERPARAMETERS
    # The second-moment state, and the two sums over rows: the column energies of G and of N
    # (NAMO adds each up; NAMO-D uses them column by column).
    second_moment = StateEntry("grad_sq_avg", "scalar", nonnegative=True)
    state_names = frozenset({"momentum", "grad_sq_avg"})
    sums = ("grad_col_sumsq", "n_col_sumsq")

    def ns_eps(self, group: Mapping[str, Any]) -> float:
        return ref.NAMO_NS_EPS

    def state_entries(self, group: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[StateEntry, ...]:
        return (StateEntry("momentum", "param", compact=True), self.second_moment)

    def reductions(self, group: Mapping[str, Any], shape: tuple[int, int]) -> dict[str, int]:
        return dict.fromkeys(self.sums, shape[1])

    def program(self, bucket: Bucket, backend: str, plan: StepPlan | None = None) -> Program:
        if backend == "triton":
            from ._triton_namo import TritonNAMO

            return TritonNAMO(bucket, plan, columns=False)
        return EagerNAMO(bucket, columns=False)

    def unsupported_by_triton(self, group: Mapping[str, Any], param: Any, grad: Any) -> str | None:
        from ._triton_matrix import unsupported_reason

        return unsupported_reason(group, param, grad)


class EagerNAMO(M.EagerMatrixProgram):
    """NAMO (``columns=False``) or NAMO-D (``columns=True``) with ``trasmuon.reference``,
    matrix by matrix."""

    def __init__(self, bucket: Bucket, columns: bool) -> None:
        self.bucket = bucket
        self.columns = columns
        self._out: list[dict[str, Any]] = []

    def prepare(self) -> None:
        b = self.bucket
        g = b.group
        acc = b.state_dtype
        grad_sums, n_sums = (b.reductions[k] for k in b.rule.sums)
        for i, grad in enumerate(b.grads()):  # the raw gradient, before the momentum
            grad_sums[i, b.cols].copy_(ref.column_energy(grad, acc))
        M.eager_momentum(b, g["betas"][0], g["nesterov"])  # sets b.ns_input = N
        for i, n in enumerate(b.ns_input):
            n_sums[i, b.cols].copy_(ref.column_energy(n, acc))

    def finish(self) -> None:
        b = self.bucket
        g = b.group
        lr = M.eager_lr(b)
        grad_sums, n_sums = (b.reductions[k] for k in b.rule.sums)
        clamp = g["clamp"] if self.columns else None
        key = b.rule.second_moment.name
        self._out = []
        for i, (view, ortho, state, step) in enumerate(
                zip(b.views(), b.ortho, b.rule_states(), b.steps(), strict=True)):
            out = ref.namo_update_stage_(
                view, ortho, state[key], step, lr, grad_col_sumsq=grad_sums[i],
                n_col_sumsq=n_sums[i], betas=g["betas"], eps=g["eps"],
                weight_decay=g["weight_decay"], scale=g["scale"],
                weight_decay_mode=g["weight_decay_mode"], clamp=clamp, shape=b.shape, cols=b.cols)
            if self.collect:
                self._out.append(out)

    def diagnostics(self) -> list[dict[str, Any]]:
        return [namo_diagnostics(o, self.bucket.group, self.columns) for o in self._out]


NAMO = register(NAMORule())
