"""The diagnostics of the matrix rules (``MatrixOptimizer.diagnostics``) from a step's
intermediates, shared by each rule's eager and Triton programs (a module of its own, so that
neither program module imports the other)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import reference as ref


def matrix_diagnostics(out: Mapping[str, Any], group: Mapping[str, Any], gate_on: bool) -> dict[str, Any]:
    """The Appendix G observables of one matrix from its step's intermediates (device tensors,
    no host sync): see ``MatrixOptimizer.diagnostics``."""
    values = {"eta_hat": out["eta_hat"].reshape(())}
    if not gate_on:
        return values
    state, energy, gate = out["state"], out["energy"], out["gate"]
    d_in = energy.shape[-1]
    energy_ref = state["energy_ref"]
    ratio = ref.energy_ratio(energy, energy_ref, group["energy_eps"])
    trigger = group["clip_trigger"]
    triggered = ratio > trigger if trigger is not None else gate < 1.0
    values.update(
        energy_cur=ref.kth_smallest(energy, ref.quantile_rank(d_in, group["energy_quantile"])),
        energy_ref=energy_ref.clone(),
        r_q95=ref.kth_smallest(ratio, ref.quantile_rank(d_in, 0.95)),
        r_max=ratio.max(),
        c_min=gate.min(),
        c_mean=gate.mean(),
        triggered_frac=triggered.to(ratio.dtype).mean(),
        c_ema_min=state["c_ema"].min(),
    )
    if group["schedule_free"]:
        values["c_avg_mean"] = ref.schedule_free_average(
            state["sf_lr2_sum"], state["sf_c_lr2_sum"]).mean()
    return values


def namo_diagnostics(out: Mapping[str, Any], group: Mapping[str, Any], columns: bool) -> dict[str, Any]:
    """NAMO: the adaptive step ``alpha`` and the two step sizes. NAMO-D: the per-column scale
    d_j's min, mean and max, the share of columns the clamp moved (``clamped_frac``), and the
    largest update step."""
    if not columns:
        return {"alpha": out["alpha"].reshape(()), "step_wd": out["step_wd"].reshape(()),
                "step_up": out["step_up"].reshape(())}
    d, raw = out["d"], out["d_raw"]
    return {"d_min": d.min(), "d_mean": d.mean(), "d_max": d.max(),
            "clamped_frac": (d != raw).to(d.dtype).mean(), "step_up_max": out["step_up"].max()}
