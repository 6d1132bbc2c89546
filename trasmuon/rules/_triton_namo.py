"""The Triton program of NAMO and NAMO-D: the momentum pass (which also reduces the column
energies of G and of the float32 Newton-Schulz input N), Newton-Schulz, the per-matrix factor
kernel (``trasmuon_kernels.namo``) and the update pass with a decay and a step per matrix
(NAMO) or per column (NAMO-D)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import reference as ref
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
        from trasmuon_kernels.update import prepare_update_pass

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
            update = prepare_update_pass(
                self.param_table.bucket, self.o, lr=self.lr, step_size=1.0, col_gate=self.step_up,
                decay=self.decay, props=self.props)
        else:
            update = prepare_update_pass(
                self.param_table.bucket, self.o, lr=self.lr, step_size=self.step_up,
                decay=self.decay, props=self.props)
        self.finish_launches = [*factors, *update]

    def diagnostics(self) -> list[dict[str, Any]]:
        from .namo import namo_diagnostics

        b = self.bucket
        g = b.group
        d_out, d_in = b.shape
        lr = self.lr.item()
        shape = ref.namo_shape_factor(g["scale"], d_out, d_in)
        out = []
        for i in range(b.count):
            base = ref.namo_base_step(lr, tuple(g["betas"]), int(self.steps[i].item()))
            nsum = b.reductions["n_col_sumsq"][i]
            if self.columns:
                raw = ref.namod_raw_scale(nsum, self.v[i], g["eps"])
                d = ref.namod_clamp(raw, g["clamp"])
                entry = {"d_raw": raw, "d": d, "step_up": self.step_up[i]}
            else:
                alpha = ref.namo_alpha(base, nsum.sum(-1), self.v[i], g["eps"])
                step_wd, step_up = ref.namo_step_sizes(alpha, shape)
                entry = {"alpha": alpha, "step_wd": step_wd, "step_up": torch.as_tensor(step_up)}
            out.append(namo_diagnostics(entry, g, self.columns))
        return out
