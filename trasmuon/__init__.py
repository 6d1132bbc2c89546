"""trasmuon: the TrasMuon optimizer (arXiv 2602.13498) and its Muon-family baselines."""

from . import reference
from .optimizer import (
    BACKENDS,
    GROUP_DEFAULTS,
    MATRIX_RULES,
    RULES,
    AdamW,
    MatrixOptimizer,
    Muon,
    NorMuon,
    TrasMuon,
)
from .param_groups import split_params

__all__ = [
    "BACKENDS",
    "GROUP_DEFAULTS",
    "MATRIX_RULES",
    "RULES",
    "AdamW",
    "MatrixOptimizer",
    "Muon",
    "NorMuon",
    "TrasMuon",
    "reference",
    "split_params",
]

__version__ = "0.1.0"
