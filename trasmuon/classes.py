"""The optimizer classes: TrasMuon, NorMuon, Muon, NAMO, NAMO-D and AdamW, each
:class:`~trasmuon.optimizer.MatrixOptimizer` with its matrix rule and that rule's defaults as
keyword arguments (one signature per class, checked against the rule's hyperparameter table
by tests/test_classes.py; the arguments reach the param groups through
``constructor_arguments``). Their rules are in :mod:`trasmuon.rules`; the options after the
hyperparameters are in docs/usage.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import reference as ref
from .optimizer import MatrixOptimizer, constructor_arguments
from .rules import Hyperparameter
from .rules._checks import in_range, valid_betas

__all__ = ["NAMO", "NAMOD", "AdamW", "Muon", "NorMuon", "TrasMuon"]


class TrasMuon(MatrixOptimizer):
    """TrasMuon (arXiv 2602.13498): NorMuon-style orthogonalized momentum with a global
    RMS-calibrated step size and an energy-based column gate that damps bursty columns.

    2D params take the TrasMuon rule and all others AdamW (with the group's lr, betas, eps,
    weight_decay), unless their param group names a ``rule``. Arguments and defaults follow
    docs/rule.md, which maps each one to the paper's equation and to the code; the options
    after ``sf_mix`` are in docs/usage.md.
    """

    matrix_rule = "trasmuon"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        ns_coefficients: Any = ref.TRASMUON_NS_COEFFICIENTS,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
        ns_method: str = "standard",
        ns_restarts: Sequence[int] = ref.DEFAULT_NS_RESTARTS,
        scale: float = 0.2,
        clip: bool = True,
        clip_alpha: float = 1.0,
        clip_min: float = 0.7,
        clip_trigger: float | None = 3.0,
        clip_period: int = 4,
        clip_min_cols: int = 8,
        clip_beta: float = 0.9,
        energy_beta: float = 0.99,
        energy_quantile: float = 0.5,
        energy_eps: float = 1e-12,
        energy_source: str = "momentum",
        warmup_steps: int = 0,
        schedule_free: bool = True,
        sf_mix: float = 0.3,
        state_dtype: torch.dtype | None = None,
        seed: int | None = None,
        backend: str = "auto",
        check_finite: bool = False,
        diagnostics: bool = False,
        process_group: Any = None,
        check_consistency: bool = True,
        cuda_graph: bool = False,
    ) -> None:
        params, defaults, options = constructor_arguments(locals())
        super().__init__(params, defaults, **options)


class NorMuon(MatrixOptimizer):
    """NorMuon: TrasMuon's pipeline with the column gate off (row-normalized orthogonal
    momentum with the global RMS step size ``scale * lr``). 2D params take this rule and
    all others AdamW, unless their param group names a ``rule``."""

    matrix_rule = "normuon"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        ns_coefficients: Any = ref.TRASMUON_NS_COEFFICIENTS,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
        ns_method: str = "standard",
        ns_restarts: Sequence[int] = ref.DEFAULT_NS_RESTARTS,
        scale: float = 0.2,
        state_dtype: torch.dtype | None = None,
        seed: int | None = None,
        backend: str = "auto",
        check_finite: bool = False,
        diagnostics: bool = False,
        process_group: Any = None,
        check_consistency: bool = True,
        cuda_graph: bool = False,
    ) -> None:
        params, defaults, options = constructor_arguments(locals())
        super().__init__(params, defaults, **options)


_ADAMW_BETA2 = Hyperparameter("adamw_beta2", 0.95, in_range(0.0, 1.0, hi_open=True),
                              "a float in [0, 1)")


class Muon(MatrixOptimizer):
    """Muon with torch.optim.Muon's defaults and update (EMA momentum, Nesterov, Newton-Schulz,
    ``adjust_lr_fn`` shape scaling, decoupled weight decay), on the shared pipeline.

    Unlike torch.optim.Muon it also takes non-2D params, which go to AdamW with betas
    ``(momentum, adamw_beta2)`` (and the group's lr, eps and weight decay). Newton-Schulz
    normalizes by ``||X||_F + eps`` (docs/rule.md step 3) where torch.optim.Muon uses
    ``max(||X||_F, eps)``; the two agree to bf16 rounding.
    """

    matrix_rule = "muon"
    fallback_hyperparameters = (_ADAMW_BETA2,)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Any = ref.MUON_NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        adamw_beta2: float = 0.95,
        ns_dtype: torch.dtype = torch.bfloat16,
        ns_method: str = "standard",
        ns_restarts: Sequence[int] = ref.DEFAULT_NS_RESTARTS,
        state_dtype: torch.dtype | None = None,
        seed: int | None = None,
        backend: str = "auto",
        check_finite: bool = False,
        diagnostics: bool = False,
        process_group: Any = None,
        check_consistency: bool = True,
        cuda_graph: bool = False,
    ) -> None:
        params, defaults, options = constructor_arguments(locals())
        super().__init__(params, defaults, **options)

    def _upgrade_group(self, group: dict[str, Any]) -> None:
        # Muon groups once held betas = (momentum, adamw_beta2).
        if group["rule"] is None and "adamw_beta2" not in group and "betas" in group:
            group["adamw_beta2"] = group["betas"][1]
        super()._upgrade_group(group)

    def fallback_adamw(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"lr": group["lr"], "betas": (group["momentum"], group["adamw_beta2"]),
                "eps": group["eps"], "weight_decay": group["weight_decay"]}


class AdamW(MatrixOptimizer):
    """AdamW (decoupled weight decay, bias correction) with torch.optim.AdamW's defaults,
    on the shared pipeline: every param takes the AdamW rule unless its group names
    another. State is float32 for low-precision params."""

    matrix_rule = "adamw"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        backend: str = "auto",
        check_finite: bool = False,
        diagnostics: bool = False,
        process_group: Any = None,
        check_consistency: bool = True,
        cuda_graph: bool = False,
    ) -> None:
        params, defaults, options = constructor_arguments(locals())
        super().__init__(params, defaults, **options)


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
        ns_method: str = "standard",
        ns_restarts: Sequence[int] = ref.DEFAULT_NS_RESTARTS,
        scale: float = 0.2,
        weight_decay_mode: str = "adaptive",
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        state_dtype: torch.dtype | None = None,
        seed: int | None = None,
        backend: str = "auto",
        check_finite: bool = False,
        diagnostics: bool = False,
        process_group: Any = None,
        check_consistency: bool = True,
        cuda_graph: bool = False,
    ) -> None:
        params, defaults, options = constructor_arguments(locals())
        super().__init__(params, defaults, **options)

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
        ns_method: str = "standard",
        ns_restarts: Sequence[int] = ref.DEFAULT_NS_RESTARTS,
        scale: float = 0.2,
        clamp: float = 0.75,
        weight_decay_mode: str = "adaptive",
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        state_dtype: torch.dtype | None = None,
        seed: int | None = None,
        backend: str = "auto",
        check_finite: bool = False,
        diagnostics: bool = False,
        process_group: Any = None,
        check_consistency: bool = True,
        cuda_graph: bool = False,
    ) -> None:
        params, defaults, options = constructor_arguments(locals())
        MatrixOptimizer.__init__(self, params, defaults, **options)
