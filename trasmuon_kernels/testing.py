"""Tolerances and checks for kernel parity tests: one table, used by every test.

A kernel output is compared with a float64 evaluation of the eager reference on the same
inputs (never with zeros, and never with another low-precision result alone):
``|out - ref| <= rtol*|ref| + atol*max|ref|`` elementwise, and, for outputs of long
chains (matrix products), ``||out - ref||_F <= fro*||ref||_F``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    rtol: float  # elementwise, relative to |ref|: covers the output's own rounding
    atol: float  # elementwise floor, relative to max|ref|
    fro: float  # relative Frobenius error, for results of matrix products


# Keyed by the dtype of the output being judged. bf16 has 8 significant bits (one ulp is
# 2^-7 relative at worst), fp16 has 11 (2^-10), fp32 has 24 (2^-23).
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-12, atol=1e-14, fro=1e-10),
    torch.float32: Tolerance(rtol=2**-20, atol=2**-24, fro=1e-5),
    torch.float16: Tolerance(rtol=2**-10, atol=2**-14, fro=4e-3),
    torch.bfloat16: Tolerance(rtol=2**-7, atol=2**-10, fro=2e-2),
}


def poison(*shape: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An output buffer that a kernel must overwrite: NaN for floats, -1 for integers."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -1, dtype=dtype, device=device)


def assert_close_to_reference(
    out: torch.Tensor,
    ref64: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    what: str = "output",
) -> None:
    """Elementwise check of ``out`` against a float64 reference, with ``dtype``'s tolerance
    (default: ``out.dtype``). Fails on any NaN, so an unwritten poisoned element fails."""
    tol = TOLERANCES[dtype or out.dtype]
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    got = out.detach().to(torch.float64).cpu()
    want = ref64.detach().to(torch.float64).cpu()
    assert not torch.isnan(got).any(), f"{what}: NaN in output (unwritten or invalid)"
    scale = want.abs().max().item() if want.numel() else 0.0
    bound = tol.rtol * want.abs() + tol.atol * scale
    err = (got - want).abs()
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements off; worst |err| "
        f"{err.max().item():.3e} vs bound there {bound.flatten()[err.argmax()].item():.3e}"
    )


def relative_fro_error(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F in float64."""
    got = out.detach().to(torch.float64).cpu()
    want = ref64.detach().to(torch.float64).cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()
