"""trasmuon: the TrasMuon optimizer (arXiv 2602.13498) and its Muon-family baselines."""

from . import bursts, reference
from .bursts import BurstEvent, ColumnBurst
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
    "BurstEvent",
    "ColumnBurst",
    "MatrixOptimizer",
    "Muon",
    "NorMuon",
    "TrasMuon",
    "bursts",
    "reference",
    "split_params",
]

__version__ = "0.1.0"
