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
