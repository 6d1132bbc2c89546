"""The NAMO and NAMO-D optimizers (arXiv 2602.17080) on the shared pipeline; their rules are
in :mod:`trasmuon.rules.namo` and :mod:`trasmuon.rules.namo_d`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import reference as ref
from .optimizer import MatrixOptimizer, option_kwargs
from .rules import Hyperparameter
from .rules._checks import in_range, valid_betas

# The AdamW of these optimizers' non-matrix params (the authors' choice): its own betas and
# eps, the group's lr and weight decay.
ADAMW_BETAS = Hyperparameter("adamw_betas", (0.9, 0.95), valid_betas,
                             "a pair (beta1, beta2) with each in [0, 1)")
ADAMW_EPS = Hyperparameter("adamw_eps", 1e-8, in_range(0.0, float("inf"), lo_open=True),
                           "a finite float > 0")


class NAMO(MatrixOptimizer):
    """NAMO: orthogonalized (Nesterov) momentum scaled by one Adam-style adaptive step per
    matrix, with a weight decay scaled by the same step (``weight_decay_mode="adaptive"``,
    the authors' form) or by lr (``"lr"``). 2D params take the NAMO rule and all others AdamW
    with ``adamw_betas``, ``adamw_eps`` and the group's lr and weight decay, unless their
    param group names a ``rule``. See docs/rule.md, "NAMO and NAMO-D"."""

    matrix_rule = "namo"
    fallback_hyperparameters = (ADAMW_BETAS, ADAMW_EPS)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        betas: tuple[float, float] = (0.95, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        *,
        nesterov: bool = True,
        ns_coefficients: Any = ref.MUON_NS_COEFFICIENTS,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
        scale: float = 0.2,
        weight_decay_mode: str = "adaptive",
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        backend: str = "auto",
        check_finite: bool = False,
        diagnostics: bool = False,
        process_group: Any = None,
        check_consistency: bool = True,
        cuda_graph: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, nesterov=nesterov,
            ns_coefficients=ns_coefficients, ns_steps=ns_steps, ns_dtype=ns_dtype, scale=scale,
            weight_decay_mode=weight_decay_mode, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
        )
        super().__init__(params, defaults, **option_kwargs(
            backend, check_finite, diagnostics, process_group, check_consistency, cuda_graph))

    def fallback_adamw(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"lr": group["lr"], "betas": group["adamw_betas"], "eps": group["adamw_eps"],
                "weight_decay": group["weight_decay"]}


class NAMOD(NAMO):
    """NAMO-D: NAMO with a per-column adaptive step d_j clamped toward its mean
    (``clamp``: 1 makes every column equal, 0 turns the clamp off). See docs/rule.md."""

    matrix_rule = "namo_d"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        betas: tuple[float, float] = (0.95, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        *,
        nesterov: bool = True,
        ns_coefficients: Any = ref.MUON_NS_COEFFICIENTS,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
        scale: float = 0.2,
        clamp: float = 0.75,
        weight_decay_mode: str = "adaptive",
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        backend: str = "auto",
        check_finite: bool = False,
        diagnostics: bool = False,
        process_group: Any = None,
        check_consistency: bool = True,
        cuda_graph: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, nesterov=nesterov,
            ns_coefficients=ns_coefficients, ns_steps=ns_steps, ns_dtype=ns_dtype, scale=scale,
            clamp=clamp, weight_decay_mode=weight_decay_mode, adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
        )
        MatrixOptimizer.__init__(self, params, defaults, **option_kwargs(
            backend, check_finite, diagnostics, process_group, check_consistency, cuda_graph))
