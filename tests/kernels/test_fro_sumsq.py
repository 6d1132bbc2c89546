"""The per-matrix sum of squares kernel (trasmuon_kernels/fro_sumsq.py).

Compared with a float64 sum of squares of bf16(x) (the NS input); an fp32 accumulation of
a few thousand terms is held to the fp32 chain tolerance of the table.
"""

from __future__ import annotations

import pytest
import torch

from trasmuon_kernels.fro_sumsq import fro_sumsq
from trasmuon_kernels.testing import TOLERANCES, poison, relative_fro_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "shape, dtype",
    [((3, 5, 7), torch.bfloat16), ((2, 40, 70), torch.float32), ((1, 1, 1), torch.float32)],
)
def test_matches_float64(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype).to(DEVICE)
    out = poison(shape[0], dtype=torch.float32, device=DEVICE)
    fro_sumsq(x, out)
    want = (x.to(torch.bfloat16).double() ** 2).sum((-2, -1))
    assert not out.isnan().any()
    assert relative_fro_error(out, want) <= TOLERANCES[torch.float32].fro
    for b in range(shape[0]):
        assert abs(out[b].item() - want[b].item()) <= TOLERANCES[torch.float32].fro * want[b].item()


def test_strided_and_zero():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, 20, generator=g).to(DEVICE).mT  # column-major matrices
    x[1] = 0.0
    partials = poison(64, dtype=torch.float32, device=DEVICE)
    out = fro_sumsq(x, partials=partials)
    want = (x.to(torch.bfloat16).double() ** 2).sum((-2, -1))
    assert out[1].item() == 0.0
    assert relative_fro_error(out, want) <= TOLERANCES[torch.float32].fro
