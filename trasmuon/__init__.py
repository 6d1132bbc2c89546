"""trasmuon: the TrasMuon optimizer (arXiv 2602.13498) and its Muon-family baselines."""

from . import bursts, reference, rules
from .bursts import BurstEvent, ColumnBurst
from .classes import NAMO, NAMOD, AdamW, Muon, NorMuon, TrasMuon
from .optimizer import BACKENDS, MATRIX_RULES, ORIENTATIONS, RULES, MatrixOptimizer
from .param_groups import split_params
from .splitting import (
    DistributedAdamW,
    DistributedMuon,
    DistributedNAMO,
    DistributedNAMOD,
    DistributedNorMuon,
    DistributedTrasMuon,
)

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
