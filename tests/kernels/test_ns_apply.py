"""The update product kernel (trasmuon_kernels/ns_apply.py) against float64 products.

out = s * (alpha * Y + L @ R) is compared elementwise with a float64 evaluation on the same
bf16 inputs (bf16 row of the tolerance table: fp32 accumulation, one rounding). The fused
row sums of squares are compared with float64 sums over the kernel's own bf16 output (fp32
chain tolerance), both with one and with several column tiles (partials + torch.sum).
"""

from __future__ import annotations

import pytest
import torch

from trasmuon_kernels.ns_apply import ApplyConfig, ns_apply
from trasmuon_kernels.testing import (
    TOLERANCES,
    assert_close_to_reference,
    poison,
    relative_fro_error,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = ApplyConfig(16, 16, 16, 2, 4, 2)


def bf16_input(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(torch.bfloat16).to(DEVICE)


def symmetric(batch, d, seed):
    z = bf16_input(batch, d, d, seed=seed)
    return ((z + z.mT) / 4).to(torch.bfloat16)


@pytest.mark.parametrize(
    "batch, m, n, tall, config",
    [
        (1, 17, 33, False, SMALL),  # wide: B X, 2x3 tiles
        (1, 33, 17, True, SMALL),  # tall: P B on the stored layout
        (3, 31, 47, False, None),
        (2, 47, 31, True, None),
        (1, 7, 1, True, None),
    ],
)
def test_apply_matches_float64(batch, m, n, tall, config):
    d = min(m, n)
    x = bf16_input(batch, m, n, seed=1)
    poly = symmetric(batch, d, seed=2)
    left, right = (x, poly) if tall else (poly, x)
    alpha = 2.8366
    out = poison(batch, m, n, dtype=torch.bfloat16, device=DEVICE)
    rsq = poison(batch, m, dtype=torch.float32, device=DEVICE)
    ns_apply(left, right, x, out, alpha=alpha, row_sumsq_out=rsq, config=config)
    want = alpha * x.double() + left.double() @ right.double()
    assert_close_to_reference(out, want, what="a X + B X")
    rsq_want = (out.double() ** 2).sum(-1)
    assert not rsq.isnan().any()
    assert relative_fro_error(rsq, rsq_want) <= TOLERANCES[torch.float32].fro


def test_apply_folds_normalization_and_reads_fp32():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 20, 35, generator=g).to(DEVICE)  # fp32: rounded to bf16 on load
    poly = symmetric(2, 20, seed=4)
    sumsq = torch.tensor([5.0, 0.25], device=DEVICE)
    eps = 1e-2
    out = poison(2, 20, 35, dtype=torch.bfloat16, device=DEVICE)
    ns_apply(poly, x, x, out, alpha=3.0, fro_sumsq=sumsq, eps=eps, config=SMALL)
    xb = x.to(torch.bfloat16).double()
    s = 1.0 / (sumsq.double().sqrt() + eps)
    want = s[:, None, None] * (3.0 * xb + poly.double() @ xb)
    assert_close_to_reference(out, want, what="s (a X + B X)")


def test_empty_inner_dimension_normalizes():
    # K = 0: out = bf16(s * Y), what newton_schulz uses for steps=0.
    x = bf16_input(2, 9, 13, seed=5)
    sumsq = (x.float() ** 2).sum((-2, -1))
    out = poison(2, 9, 13, dtype=torch.bfloat16, device=DEVICE)
    rsq = poison(2, 9, dtype=torch.float32, device=DEVICE)
    ns_apply(
        x[:, :, :0], x[:, :0, :], x, out, alpha=1.0, fro_sumsq=sumsq, eps=1e-8, row_sumsq_out=rsq
    )
    want = x.double() / (sumsq.double().sqrt() + 1e-8)[:, None, None]
    assert_close_to_reference(out, want)
    assert relative_fro_error(rsq, (out.double() ** 2).sum(-1)) <= TOLERANCES[torch.float32].fro


def test_rejects_bad_shapes():
    x = bf16_input(1, 4, 6)
    poly = symmetric(1, 4, seed=6)
    with pytest.raises(ValueError):
        ns_apply(poly, x, x, torch.empty(1, 4, 5, dtype=torch.bfloat16, device=DEVICE), alpha=1.0)
    with pytest.raises(ValueError):
        ns_apply(poly, x, x, torch.empty(1, 4, 6, dtype=torch.float32, device=DEVICE), alpha=1.0)
