"""Muon with per-row RMS normalization (``rule="muon_rows"``): the example of adding a rule
(docs/architecture.md, "Adding a rule").

Muon's step (EMA momentum with Nesterov, Newton–Schulz, lr times ``adjust_lr_fn``'s shape
factor, decoupled weight decay) with row i of O scaled by 1 / (sqrt(v_i) + eps), v_i the EMA
(``beta2``) of the row's mean square of O: NorMuon's row normalization without its global
RMS step size (docs/rule.md, "Muon with row normalization"):

    v_i <- beta2 v_i + (1 - beta2) mean_j O_ij^2,    r_i = lr * factor / (sqrt(v_i) + eps),
    W <- (1 - lr wd) W - r_i O_ij.

Everything is an existing stage: Muon's momentum pass and Newton–Schulz with O's row sums,
NorMuon's row statistics (``reference.row_normalization_stage_``; on Triton the row-stats kernel
without eta_hat), and the update pass with one step size times a per-row factor
(``reference.weight_update_pass_(step_size=..., rowscale=...)``; the kernel's ``StepRows``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import reference as ref
from . import Hyperparameter, Program, StateEntry, register
from . import _matrix as M
from ._checks import in_range
from .muon import EagerMuon, MuonRule

if TYPE_CHECKING:
    from ..plan import Bucket, StepPlan

BETA2 = Hyperparameter("beta2", 0.95, in_range(0.0, 1.0, hi_open=True), "a float in [0, 1)")


class MuonRowsRule(MuonRule):
    name = "muon_rows"
    hyperparameters = (*MuonRule.hyperparameters, BETA2)
    state_names = frozenset({"momentum", "row_v"})
    needs_row_sumsq = True  # whole rows' sums of O^2 (an exchange sends them with O)

    def state_entries(self, group: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[StateEntry, ...]:
        return (*super().state_entries(group, shape), StateEntry("row_v", "rows", nonnegative=True))

    def program(self, bucket: Bucket, backend: str, plan: StepPlan | None = None) -> Program:
        if backend == "triton":
            return _triton_program()(bucket, plan)
        return EagerMuonRows(bucket)


class EagerMuonRows(EagerMuon):
    """Muon's momentum and update with NorMuon's row statistics in between."""

    def post(self) -> None:
        b = self.bucket
        g = b.group
        row_sums = b.ortho_row_sumsq or [None] * b.count  # whole rows' sums, from an exchange
        self._rowscale = [
            ref.row_normalization_stage_(ortho, state, b.shape[1], beta2=g["beta2"], eps=g["eps"],
                                         sumsq=row_sums[i])
            for i, (ortho, state) in enumerate(zip(b.ortho, b.rule_states(), strict=True))]

    def finish(self) -> None:
        b = self.bucket
        g = b.group
        lr = M.eager_lr(b)
        step = ref.muon_lr(lr, g["adjust_lr_fn"], *b.shape)
        for view, ortho, rowscale in zip(b.views(), b.ortho, self._rowscale, strict=True):
            ref.weight_update_pass_(view, ortho, lr, g["weight_decay"], step_size=step, rowscale=rowscale)


@functools.cache
def _triton_program() -> type:
    # Defined on first use: the Triton programs' base module imports the plan, which
    # imports this package (the rule modules load while it initializes).
    from ._triton_matrix import TritonMuon, stack_state

    class _TritonMuonRows(TritonMuon):
        """Muon's launches with the row-stats kernel (no eta_hat) after Newton–Schulz and
        the update pass's ``StepRows`` row factor."""

        def build_rule(self) -> None:
            import torch

            from trasmuon_kernels.update import StepRows, prepare_row_stats, prepare_update_pass

            b = self.bucket
            g = b.group
            self.factor = ref.muon_lr(1.0, g["adjust_lr_fn"], *b.shape)
            rows = b.local_rows
            self.row_v = stack_state(b, "row_v", (rows,), 0.0)
            self.rowscale = torch.empty(b.count, rows, dtype=torch.float32, device=b.device)
            self.post_launches = prepare_row_stats(
                self.row_v, self.row_sumsq, d_in=b.shape[1], beta2=g["beta2"], eps=g["eps"],
                scale=1.0, lr=self.lr, eta_eps=ref.ETA_HAT_EPS, rowscale_out=self.rowscale,
                with_eta_hat=False, props=self.props)
            self.finish_launches = prepare_update_pass(
                self.param_table.bucket, self.o, lr=self.lr, weight_decay=g["weight_decay"],
                row=StepRows(self.lr, self.rowscale, self.factor), props=self.props)

    return _TritonMuonRows




MUON_ROWS = register(MuonRowsRule())
