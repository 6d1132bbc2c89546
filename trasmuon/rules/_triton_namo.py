"""The Triton program of NAMO and NAMO-D: the momentum pass (which also reduces the column
energies of G and of the float32 Newton-Schulz input N), Newton-Schulz, the per-matrix factor
kernel (``trasmuon_kernels.namo``) and the update pass with a decay and a step per matrix
(NAMO) or per column (NAMO-D)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import reference as ref
from ._diagnostics import namo_diagnostics
from ._triton_matrix import TritonMatrixProgram, stack_state

if TYPE_CHECKING:
    from ..plan import Bucket, StepPlan


class TritonNAMO(TritonMatrixProgram):
    energy_source = "grad"  # the column energies of the raw gradient

    def __init__(self, bucket: Bucket, plan: StepPlan, *, columns: bool) -> None:
        super().__init__(bucket, plan)
        self.columns = columns

    def pass1_energy_out(self) -> Tensor | None:
        return self.bucket.reductions["grad_col_sumsq"]

    def pass1_input_energy_out(self) -> Tensor | None:
        return self.bucket.reductions["n_col_sumsq"]

    def build_rule(self) -> None:
        from trasmuon_kernels.namo import prepare_namo_factors
        from trasmuon_kernels.update import (
            DecayPerColumn,
            DecayPerMatrix,
            StepSize,
            prepare_update_pass,
        )

        b = self.bucket
        g = b.group
        d_out, d_in = b.shape
        key = b.rule.second_moment.name
        self.v = stack_state(b, key, (d_in,) if self.columns else (), 0.0)
        factors = prepare_namo_factors(
            self.v, b.reductions["grad_col_sumsq"], b.reductions["n_col_sumsq"], self.steps,
            self.lr, betas=tuple(g["betas"]), eps=g["eps"], weight_decay=g["weight_decay"],
            scale_shape=ref.namo_shape_factor(g["scale"], d_out, d_in),
            weight_decay_mode=g["weight_decay_mode"],
            clamp=g["clamp"] if self.columns else None, bias_eps=ref.NAMO_BIAS_EPS,
            props=self.props)
        self.decay, self.step_up = factors.result
        if self.columns:  # column j scaled by step_up_j: the update pass's column factor
            decay = (DecayPerColumn(self.decay[:, b.cols]) if self.decay.ndim == 2
                     else DecayPerMatrix(self.decay))
            update = prepare_update_pass(
                self.param_table.bucket, self.o, lr=self.lr, row=StepSize(1.0),
                col_gate=self.step_up[:, b.cols], decay=decay, props=self.props)
        else:
            update = prepare_update_pass(
                self.param_table.bucket, self.o, lr=self.lr, row=StepSize(self.step_up),
                decay=DecayPerMatrix(self.decay), props=self.props)
        self.finish_launches = [*factors, *update]

    def diagnostics(self) -> list[dict[str, Any]]:

        b = self.bucket
        g = b.group
        d_out, d_in = b.shape
        lr = self.lr.item()
        out = []
        for i in range(b.count):
            # The factors again from the stored v (which the kernel updated): what the
            # kernel computed but does not keep.
            entry = ref.namo_factors(
                self.v[i], b.reductions["n_col_sumsq"][i], int(self.steps[i].item()), lr,
                betas=tuple(g["betas"]), eps=g["eps"], weight_decay=g["weight_decay"],
                scale=g["scale"], d_out=d_out, d_in=d_in, weight_decay_mode=g["weight_decay_mode"],
                clamp=g["clamp"] if self.columns else None)
            entry["step_up"] = self.step_up[i] if self.columns else torch.as_tensor(entry["step_up"])
            out.append(namo_diagnostics(entry, g, self.columns))
        return out
