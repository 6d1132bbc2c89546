"""NAMO-D (arXiv 2602.17080): NAMO with one clamped adaptive step per column of the (out, in)
matrix, the input features (the axis of TrasMuon's gate); docs/rule.md, "NAMO and NAMO-D".
Its stages are NAMO's with column sums over rows in place of Frobenius norms."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Hyperparameter, Program, StateEntry, register
from ._checks import in_range
from .namo import HYPERPARAMETERS, EagerNAMO, NAMORule

if TYPE_CHECKING:
    from ..plan import Bucket, StepPlan

CLAMP = Hyperparameter("clamp", 0.75, in_range(0.0, 1.0), "a float in [0, 1] (0: no clamp)")


class NAMODRule(NAMORule):
    name = "namo_d"
    hyperparameters = (*HYPERPARAMETERS, CLAMP)
    second_moment = StateEntry("col_grad_sq_avg", "cols", nonnegative=True)
    state_names = frozenset({"momentum", "col_grad_sq_avg"})

    def program(self, bucket: Bucket, backend: str, plan: StepPlan | None = None) -> Program:
        if backend == "triton":
            from ._triton_namo import TritonNAMO

            return TritonNAMO(bucket, plan, columns=True)
        return EagerNAMO(bucket, columns=True)


NAMO_D = register(NAMODRule())
