"""trasmuon: the TrasMuon optimizer (arXiv 2602.13498) and its Muon-family baselines."""

from . import bursts, reference, rules
from .bursts import BurstEvent, ColumnBurst
from .distributed import (
    DistributedAdamW,
    DistributedMuon,
    DistributedNAMO,
    DistributedNAMOD,
    DistributedNorMuon,
    DistributedTrasMuon,
)
from .namo import NAMO, NAMOD
from .optimizer import (
    BACKENDS,
    MATRIX_RULES,
    ORIENTATIONS,
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
    "MATRIX_RULES",
    "NAMO",
    "NAMOD",
    "ORIENTATIONS",
    "RULES",
    "AdamW",
    "BurstEvent",
    "ColumnBurst",
    "DistributedAdamW",
    "DistributedMuon",
    "DistributedNAMO",
    "DistributedNAMOD",
    "DistributedNorMuon",
    "DistributedTrasMuon",
    "MatrixOptimizer",
    "Muon",
    "NorMuon",
    "TrasMuon",
    "bursts",
    "reference",
    "rules",
    "split_params",
]

__version__ = "0.1.0"
