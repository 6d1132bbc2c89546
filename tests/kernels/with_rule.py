"""The kernels' launchers called with the eager reference's arguments.

``trasmuon_kernels`` takes what the rule defines as explicit arguments (the 1-based rank of
the energy quantile, the schedule-free and eta_hat epsilons); these wrappers resolve them
from ``trasmuon.reference`` as the Triton step does (``trasmuon/rules/_triton_matrix.py``),
so the parity tests can pass the same keyword arguments to a kernel and to its eager twin.
"""

from __future__ import annotations

import torch

from trasmuon import reference as ref
from trasmuon_kernels import gate as _gate
from trasmuon_kernels import update as _update


def gate_args(d_in: int, energy_quantile: float) -> dict:
    """The gate kernel's rule arguments for ``d_in`` columns."""
    return dict(k=ref.quantile_rank(d_in, energy_quantile), sf_eps=ref.SCHEDULE_FREE_EPS)


def gate_stage_(state, energy, step, lr, *, energy_quantile: float, **kwargs) -> torch.Tensor:
    """``trasmuon_kernels.gate.gate_stage_`` with ``reference.gate_stage_``'s arguments."""
    d_in = energy.shape[-1] if isinstance(energy, torch.Tensor) and energy.ndim == 2 else 1
    return _gate.gate_stage_(state, energy, step, lr, **gate_args(d_in, energy_quantile), **kwargs)


def row_stats_(row_v, rowsumsq, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``trasmuon_kernels.update.row_stats_`` with the rule's eta_hat epsilon."""
    return _update.row_stats_(row_v, rowsumsq, eta_eps=ref.ETA_HAT_EPS, **kwargs)


def update_row(*, eta_hat=None, rowscale=None, o_base_sumsq=None, eta_scale=None, eta_eps=None,
               step_size=None, step_scale=1.0) -> _update.RowFactor:
    """The update pass's row factor type for ``reference.weight_update_pass_``'s keywords."""
    if eta_hat is not None:
        return _update.EtaRows(eta_hat, rowscale)
    if o_base_sumsq is not None:
        return _update.EtaFromSumsq(o_base_sumsq, rowscale, eta_scale, eta_eps)
    if rowscale is not None:
        return _update.StepRows(step_size, rowscale, step_scale)
    return _update.StepSize(step_size, step_scale)


def update_pass_(param, ortho, *, lr, weight_decay=0.0, col_gate=None, decay=None, config=None,
                 props=None, **row) -> None:
    """``trasmuon_kernels.update.update_pass_`` with ``reference.weight_update_pass_``'s
    keywords (``update_row``; a (B,) ``decay`` per matrix, a (B, d_in) one per column)."""
    if decay is not None:
        decay = (_update.DecayPerColumn if decay.ndim == 2 else _update.DecayPerMatrix)(decay)
    _update.update_pass_(param, ortho, lr=lr, weight_decay=weight_decay, row=update_row(**row),
                         col_gate=col_gate, decay=decay, config=config, props=props)
