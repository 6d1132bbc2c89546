"""The optimizer classes with DDP work splitting on by default: ``Distributed<Class>`` is
``<Class>`` with ``process_group`` defaulting to the world (docs/distributed.md). Apart from
trasmuon/distributed.py (the exchange machinery, which the optimizers call) so that neither
of the optimizer modules and the machinery imports the other in a circle."""

from __future__ import annotations

from .classes import NAMO, NAMOD, AdamW, Muon, NorMuon, TrasMuon
from .optimizer import MatrixOptimizer

_CLASSES: dict[type, type] = {}


def distributed(cls: type) -> type:
    """``cls`` with ``process_group`` defaulting to the world (DDP work splitting):
    ``distributed(TrasMuon)(params, lr=..., process_group=None, check_consistency=True)``.
    The same class object is returned for the same ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, MatrixOptimizer)):
        raise TypeError(f"distributed() needs a MatrixOptimizer subclass, got {cls!r}")
    if cls.split_by_default:
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(
            f"Distributed{cls.__name__}", (cls,),
            {"__module__": __name__, "split_by_default": True,
             "__doc__": f"{cls.__name__} with ``process_group`` defaulting to the world: each "
                        "rank orthogonalizes a share of the replicated matrices (DDP)."},
        )
    return _CLASSES[cls]


DistributedTrasMuon = distributed(TrasMuon)
DistributedNorMuon = distributed(NorMuon)
DistributedMuon = distributed(Muon)
DistributedNAMO = distributed(NAMO)
DistributedNAMOD = distributed(NAMOD)
DistributedAdamW = distributed(AdamW)
