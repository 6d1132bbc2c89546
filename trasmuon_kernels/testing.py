"""Tolerances and checks for kernel parity tests: one table, used by every test.

A kernel output is compared with a float64 evaluation of the eager reference on the same
inputs (never with zeros, and never with another low-precision result alone):
``|out - ref| <= rtol*|ref| + atol*max|ref|`` elementwise, and, for outputs of long
chains (matrix products), ``||out - ref||_F <= fro*||ref||_F``.

Eager twins. Many kernels have an "eager twin": torch code doing the same float32 operations
in the same order. ``assert_matches_twin`` always judges the kernel against float64 with the
table, and in addition demands bit-equality with the twin only where that is guaranteed
(``bitwise_twins``): under Triton's interpreter, whose ``tl.fma`` rounds once (checked at run
time), with a torch version in ``VERIFIED_TORCH``. Compiled kernels may legitimately differ
in the last bit (FMA contraction, reduction trees, tensor-core accumulation order), so there
the float64 check is the whole judgement and a ``TwinToleranceWarning`` says so: the test
still runs and still fails on a real error, it is never skipped. docs/testing.md has the
details.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import torch

from ._common import interpreting


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


# --------------------------------------------------------------------------------------
# Eager twins: bitwise where guaranteed, the table's tolerance against float64 elsewhere
# --------------------------------------------------------------------------------------
# torch versions (major.minor) whose CPU eager ops were checked to give, under Triton's
# interpreter, the same bits as the kernels (tests/kernels/ and tests/test_fused_backend.py
# with bitwise twins on: 2.11.0 and 2.13.0, with Triton 3.9.0). Add a version only after
# running those tests on it with TRASMUON_BITWISE_TWINS=1.
VERIFIED_TORCH = ("2.11", "2.13")

# "1" forces the bitwise comparison (to verify a new torch version), "0" forces the tolerance
# one; unset (or anything else): decided by ``bitwise_twins``.
BITWISE_ENV = "TRASMUON_BITWISE_TWINS"


class TwinToleranceWarning(UserWarning):
    """A kernel was judged against float64 only, not bit for bit against its eager twin."""


@functools.cache
def interpreter_fma_is_exact() -> bool:
    """Whether the interpreter's ``tl.fma`` rounds once, as a hardware fma and ATen's CPU
    kernels (``std::fma``, vector fmadd) do. Triton 3.6's interpreter computes ``x*y + z``
    with two float32 roundings; 3.9's rounds once. Probed on values where the two differ."""
    import triton
    import triton.language as tl

    @triton.jit
    def _fma_probe(x_ptr, out_ptr):
        x = tl.load(x_ptr)
        tl.store(out_ptr, tl.fma(x, x, -1.0))

    # (1 + 2^-12)^2 - 1 = 2^-11 + 2^-24: exact with one rounding; two give 2^-11.
    x = torch.tensor([1.0 + 2.0**-12])
    out = torch.zeros(1)
    _fma_probe[(1,)](x, out)
    return out.item() == 2.0**-11 + 2.0**-24


def bitwise_twins() -> tuple[bool, str]:
    """(whether kernels must equal their eager twins bit for bit here, why)."""
    forced = os.environ.get(BITWISE_ENV)
    if forced in ("0", "1"):
        return forced == "1", f"forced by {BITWISE_ENV}={forced}"
    if not interpreting():
        return False, ("compiled kernels: FMA contraction, reduction order and tensor-core "
                       "accumulation order are the compiler's and the hardware's")
    if not interpreter_fma_is_exact():
        import triton

        return False, f"Triton {triton.__version__}'s interpreter rounds tl.fma twice"
    version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if version not in VERIFIED_TORCH:
        return False, (f"torch {torch.__version__}: bit-equality with the eager twins was "
                       f"verified only for torch {', '.join(VERIFIED_TORCH)}")
    return True, f"Triton's interpreter, torch {version}"


def assert_matches_twin(
    out: torch.Tensor,
    twin: torch.Tensor,
    ref64: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    what: str = "output",
    chain: bool = False,
) -> None:
    """A kernel output against float64 and against its eager twin.

    Always: ``out`` against ``ref64`` with the table's tolerance of ``dtype`` (default
    ``out.dtype``): elementwise, or, with ``chain``, the relative Frobenius bound ``fro``
    (outputs of matrix-product chains). Where ``bitwise_twins()`` holds, also bit-equality
    with ``twin`` (NaN where the twin has NaN); elsewhere a ``TwinToleranceWarning`` records
    that the float64 check was the whole judgement."""
    if chain:
        tol = TOLERANCES[dtype or out.dtype]
        assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
        assert not torch.isnan(out).any(), f"{what}: NaN in output (unwritten or invalid)"
        err = relative_fro_error(out, ref64)
        assert err <= tol.fro, f"{what}: relative Frobenius error {err:.3e} > {tol.fro:.1e}"
    else:
        assert_close_to_reference(out, ref64, dtype=dtype, what=what)
    bitwise, why = bitwise_twins()
    if bitwise:
        assert_bitwise_equal(out, twin, what=f"{what} vs its eager twin")
    else:
        # One message for every output, so that pytest's summary counts them in one line.
        warnings.warn(f"kernel outputs judged against float64 only, not bitwise against their "
                      f"eager twins: {why}", TwinToleranceWarning, stacklevel=2)


def assert_bitwise_equal(out: torch.Tensor, want: torch.Tensor, *, what: str = "output") -> None:
    """Same shape, dtype and bits (NaNs in the same places count as equal)."""
    assert out.shape == want.shape and out.dtype == want.dtype, (
        f"{what}: {tuple(out.shape)} {out.dtype} != {tuple(want.shape)} {want.dtype}")
    a, b = out.detach().cpu(), want.detach().cpu()
    same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
    if not bool(same.all()):
        diff = ~same
        ulps = ""
        if a.dtype == torch.float32:
            ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
            ulps = f", at most {int((ia - ib).abs()[diff].max())} ulp apart"
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.numel()} elements differ{ulps}")
