"""TrasMuon (arXiv 2602.13498): docs/rule.md, steps 1-12.

Stages of a bucket (see :mod:`trasmuon.rules`):

* ``prepare``: momentum (step 2), the Newton–Schulz input, and the column energies of M or G
  (step 7) as sums over rows;
* ``post``, given O: the row second moment and row scale (steps 4-5), ||O_base||_F^2 as a sum
  over rows (step 6), and the column energies of O_base for ``energy_source="update"``;
* ``finish``, once the sums over rows are complete: eta_hat (step 6), the gate (steps 8-11)
  and the weight update with decay (steps 1 and 12).

Eager: the functions of ``trasmuon.reference``, matrix by matrix. Triton: the momentum pass,
row-stats, gate and update kernels, one launch per stage for the whole bucket
(:mod:`trasmuon.rules._triton_matrix`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .. import reference as ref
from . import Hyperparameter, MatrixRule, Program, StateEntry, register
from . import _matrix as M
from ._checks import in_range, int_at_least, is_bool, one_of
from ._diagnostics import matrix_diagnostics

if TYPE_CHECKING:
    from ..plan import Bucket, StepPlan

GATE_HYPERPARAMETERS = (
    Hyperparameter("clip", True, is_bool, "a bool"),
    Hyperparameter("clip_alpha", 1.0, in_range(0.0, math.inf), "a finite float >= 0"),
    Hyperparameter("clip_min", 0.7, in_range(0.0, 1.0, lo_open=True), "a float in (0, 1]"),
    Hyperparameter("clip_trigger", 3.0, lambda v: v is None or in_range(0.0, math.inf)(v),
                   "None or a float >= 0"),
    Hyperparameter("clip_period", 4, int_at_least(1), "an int >= 1"),
    Hyperparameter("clip_min_cols", 8, int_at_least(1), "an int >= 1"),
    Hyperparameter("clip_beta", 0.9, in_range(0.0, 1.0, hi_open=True), "a float in [0, 1)"),
    Hyperparameter("energy_beta", 0.99, in_range(0.0, 1.0, hi_open=True), "a float in [0, 1)"),
    Hyperparameter("energy_quantile", 0.5, in_range(0.0, 1.0, lo_open=True), "a float in (0, 1]"),
    Hyperparameter("energy_eps", 1e-12, in_range(0.0, math.inf, lo_open=True), "a finite float > 0"),
    Hyperparameter("energy_source", "momentum", one_of(ref.ENERGY_SOURCES),
                   f"one of {ref.ENERGY_SOURCES}"),
    Hyperparameter("warmup_steps", 0, int_at_least(0), "an int >= 0"),
    Hyperparameter("schedule_free", True, is_bool, "a bool"),
    Hyperparameter("sf_mix", 0.3, in_range(0.0, 1.0), "a float in [0, 1]"),
)
# The keys ``reference.gate_stage_`` (and the gate kernel) take as keyword arguments.
GATE_KWARGS = ("warmup_steps", "clip_period", "clip_alpha", "clip_min", "clip_trigger",
               "clip_beta", "energy_beta", "energy_quantile", "energy_eps", "schedule_free",
               "sf_mix")
NORMUON_HYPERPARAMETERS = (
    M.lr(1e-3), M.betas((0.95, 0.95)), M.eps(1e-8), M.weight_decay(0.0), M.nesterov(False),
    M.ns_coefficients(ref.TRASMUON_NS_COEFFICIENTS), M.NS_STEPS, M.NS_DTYPE, M.NS_METHOD,
    M.NS_RESTARTS, M.NS_BLOCKS, M.SCALE, M.ORIENTATION, M.FLATTEN, M.STACKED,
    M.STATE_DTYPE, M.SEED,
)


class TrasMuonRule(MatrixRule):
    name = "trasmuon"
    hyperparameters = NORMUON_HYPERPARAMETERS + GATE_HYPERPARAMETERS
    needs_row_sumsq = True
    state_names = frozenset({"momentum", "row_v", "c_ema", "energy_ref", "sf_lr2_sum", "sf_c_lr2_sum",
                             "c_last"})

    def gate_on(self, group: Mapping[str, Any], shape: tuple[int, int]) -> bool:
        return ref.gate_is_on(group["clip"], shape[1], group["clip_min_cols"])

    def state_entries(self, group: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[StateEntry, ...]:
        entries = [StateEntry("momentum", "param", compact=True), StateEntry("row_v", "rows", nonnegative=True)]
        if self.gate_on(group, shape):
            entries += [StateEntry("c_ema", "cols", 1.0), StateEntry("energy_ref", "scalar", lazy=True, nonnegative=True)]
            if group["schedule_free"]:
                entries += [StateEntry("sf_lr2_sum", "scalar", nonnegative=True),
                            StateEntry("sf_c_lr2_sum", "cols", nonnegative=True),
                            StateEntry("c_last", "cols", 1.0)]
        return tuple(entries)

    def reductions(self, group: Mapping[str, Any], shape: tuple[int, int]) -> dict[str, int]:
        sums = {"o_base_sumsq": 1}
        if self.gate_on(group, shape):
            sums["energy"] = shape[1]
        return sums

    def program(self, bucket: Bucket, backend: str, plan: StepPlan | None = None) -> Program:
        if backend == "triton":
            from ._triton_matrix import TritonTrasMuon

            return TritonTrasMuon(bucket, plan, gate_on=self.gate_on(bucket.group, bucket.shape))
        return EagerTrasMuon(bucket, gate_on=self.gate_on(bucket.group, bucket.shape))

    def unsupported_by_triton(self, group: Mapping[str, Any], param: Any, grad: Any) -> str | None:
        from ._triton_matrix import unsupported_reason

        return unsupported_reason(group, param, grad)


class EagerTrasMuon(M.EagerMatrixProgram):
    """Steps 1-12 with ``trasmuon.reference``, matrix by matrix: the stages that
    ``reference.trasmuon_update_stage_`` composes, with the sums over rows in between."""

    def __init__(self, bucket: Bucket, gate_on: bool) -> None:
        self.bucket = bucket
        self.gate_on = gate_on
        self._grads_wide: list[torch.Tensor] = []
        self._rowscale: list[torch.Tensor] = []
        self._out: list[dict[str, Any]] = []

    def prepare(self) -> None:
        b = self.bucket
        g = b.group
        self._grads_wide = M.eager_momentum(b, g["betas"][0], g["nesterov"])
        if self.gate_on and g["energy_source"] != "update":
            energy = b.reductions["energy"]
            # (the float32 momentum of this step, also where it is stored in bf16)
            for i, (grad_wide, momentum) in enumerate(zip(self._grads_wide, b.momentum_wide, strict=True)):
                energy[i, b.cols].copy_(ref.trasmuon_energy_partial(
                    {"momentum": momentum}, grad_wide, None, None, g["energy_source"]))

    def post(self) -> None:
        b = self.bucket
        g = b.group
        base = b.reductions["o_base_sumsq"]
        self._rowscale = []
        row_sums = b.ortho_row_sumsq or [None] * b.count  # whole rows' sums, from an exchange
        for i, (ortho, state) in enumerate(zip(b.ortho, b.rule_states(), strict=True)):
            rowscale, base_partial = ref.trasmuon_row_stage_(
                ortho, state, b.shape[1], beta2=g["betas"][1], eps=g["eps"], sumsq=row_sums[i])
            self._rowscale.append(rowscale)
            base[i].copy_(base_partial.reshape(1))
            if self.gate_on and g["energy_source"] == "update":
                b.reductions["energy"][i, b.cols].copy_(
                    ref.trasmuon_energy_partial(state, None, ortho, rowscale, "update"))

    def finish(self) -> None:
        b = self.bucket
        g = b.group
        d_out, d_in = b.shape
        lr = M.eager_lr(b)
        gate_kwargs = {k: g[k] for k in GATE_KWARGS} if self.gate_on else {}
        base = b.reductions["o_base_sumsq"]
        steps = b.steps()
        self._out = []
        for i, (view, ortho, state) in enumerate(zip(b.views(), b.ortho, b.rule_states(), strict=True)):
            eta = ref.eta_hat_from_sumsq(g["scale"], lr, d_out, d_in, base[i][0])
            energy = b.reductions["energy"][i] if self.gate_on else None
            gate = ref.trasmuon_apply_stage_(view, ortho, state, self._rowscale[i], eta, energy, steps[i], lr,
                                             weight_decay=g["weight_decay"], gate_kwargs=gate_kwargs,
                                             cols=b.cols)
            if self.collect:
                self._out.append({"eta_hat": eta, "energy": None if energy is None else energy.clone(),
                                  "gate": gate, "state": state})

    def diagnostics(self) -> list[dict[str, Any]]:
        return [matrix_diagnostics(o, self.bucket.group, self.gate_on) for o in self._out]


TRASMUON = register(TrasMuonRule())
