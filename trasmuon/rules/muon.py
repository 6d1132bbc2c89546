"""Muon with torch.optim.Muon's defaults and update (docs/rule.md, "The baselines"): EMA
momentum (Nesterov by default), Newton–Schulz with Muon's quintic, the shape-based step size
of ``adjust_lr_fn`` and decoupled weight decay.

Eager: ``reference.momentum_stage_`` and ``reference.muon_update_stage_`` per matrix.
Triton: the momentum pass (no energies) and the update pass with one step size per matrix,
lr * ``muon_lr`` factor, read from device memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .. import reference as ref
from . import Hyperparameter, MatrixRule, Program, StateEntry, register
from . import _matrix as M
from ._checks import in_range, one_of

if TYPE_CHECKING:
    from ..plan import Bucket, StepPlan

MOMENTUM = Hyperparameter("momentum", 0.95, in_range(0.0, 1.0, hi_open=True), "a float in [0, 1)")
ADJUST_LR_FN = Hyperparameter("adjust_lr_fn", None, one_of(ref.MUON_LR_ADJUSTMENTS),
                              f"one of {ref.MUON_LR_ADJUSTMENTS}")


class MuonRule(MatrixRule):
    name = "muon"
    hyperparameters = (
        M.lr(1e-3), M.weight_decay(0.1), MOMENTUM, M.nesterov(True),
        M.ns_coefficients(ref.MUON_NS_COEFFICIENTS), M.eps(1e-7), M.NS_STEPS, ADJUST_LR_FN,
        M.NS_DTYPE, M.NS_METHOD, M.NS_RESTARTS, M.NS_BLOCKS, M.ORIENTATION, M.FLATTEN, M.STACKED,
        M.STATE_DTYPE, M.SEED,
    )
    state_names = frozenset({"momentum"})

    def upgrade_group(self, group: dict[str, Any]) -> None:
        # Groups once carried every rule's keys: Muon's momentum was betas[0].
        if "momentum" not in group and "betas" in group:
            group["momentum"] = group.pop("betas")[0]

    def state_entries(self, group: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[StateEntry, ...]:
        return (StateEntry("momentum", "param", compact=True),)

    def program(self, bucket: Bucket, backend: str, plan: StepPlan | None = None) -> Program:
        if backend == "triton":
            from ._triton_matrix import TritonMuon

            return TritonMuon(bucket, plan)
        return EagerMuon(bucket)

    def unsupported_by_triton(self, group: Mapping[str, Any], param: Any, grad: Any) -> str | None:
        from ._triton_matrix import unsupported_reason

        return unsupported_reason(group, param, grad)


class EagerMuon(M.EagerMatrixProgram):
    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self._diagnostics: list[dict[str, Any]] = []

    def prepare(self) -> None:
        g = self.bucket.group
        M.eager_momentum(self.bucket, g["momentum"], g["nesterov"])

    def finish(self) -> None:
        b = self.bucket
        g = b.group
        lr = M.eager_lr(b)
        for view, ortho in zip(b.views(), b.ortho, strict=True):
            ref.muon_update_stage_(view, ortho, lr, weight_decay=g["weight_decay"],
                                   adjust_lr_fn=g["adjust_lr_fn"], shape=b.shape)
        if self.collect:
            step_size = ref.muon_lr(lr, g["adjust_lr_fn"], *b.shape)
            self._diagnostics = [{"step_size": torch.as_tensor(step_size)} for _ in b.params]

    def diagnostics(self) -> list[dict[str, Any]]:
        return self._diagnostics


MUON = register(MuonRule())
