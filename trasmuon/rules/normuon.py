"""NorMuon: TrasMuon's pipeline with the column gate off (docs/rule.md, "The baselines"):
row-normalized orthogonalized momentum with the RMS-calibrated step ``scale * lr``. Its
programs are TrasMuon's with the gate stage left out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import register
from .trasmuon import NORMUON_HYPERPARAMETERS, TrasMuonRule


class NorMuonRule(TrasMuonRule):
    name = "normuon"
    hyperparameters = NORMUON_HYPERPARAMETERS
    state_names = frozenset({"momentum", "row_v"})

    def gate_on(self, group: Mapping[str, Any], shape: tuple[int, int]) -> bool:
        return False


NORMUON = register(NorMuonRule())
