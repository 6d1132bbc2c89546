"""The symmetric product kernel (trasmuon_kernels/gram.py) against float64 products.

Every product is compared elementwise with a float64 evaluation on the same bf16 inputs,
with the bf16 row of the tolerance table (the kernel accumulates in fp32 and rounds once),
and its output must be exactly symmetric. Outputs are poisoned with NaN first, so an
unwritten tile (a wrong triangular mapping or mirror) fails. Small explicit configs force
several tiles per matrix so that the off-diagonal mirror and partial edge tiles run.
"""

from __future__ import annotations

import pytest
import torch

from trasmuon_kernels._common import interpreting
from trasmuon_kernels.gram import GramConfig, _sym_gram_kernel, num_upper_tiles, sym_gram
from trasmuon_kernels.testing import assert_close_to_reference, poison

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = GramConfig(block=16, block_k=16, num_warps=4, num_stages=2)


def bf16_input(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(torch.bfloat16).to(DEVICE)


def gram64(z, transposed):
    z = z.double()
    return z.mT @ z if transposed else z @ z.mT


@pytest.mark.parametrize(
    "shape, transposed, config",
    [
        ((1, 17, 33), False, SMALL),  # 2x2 tiles, partial edges
        ((1, 33, 17), True, SMALL),  # tall: Z^T Z read with swapped strides
        ((3, 31, 47), False, None),  # a stack, default config
        ((2, 47, 31), True, None),
        ((1, 1, 7), False, None),  # d = 1
        ((1, 40, 5), True, SMALL),  # 3x3 tiles
    ],
)
def test_gram_matches_float64(shape, transposed, config):
    z = bf16_input(*shape)
    d = shape[2] if transposed else shape[1]
    out = poison(shape[0], d, d, dtype=torch.bfloat16, device=DEVICE)
    sym_gram(z, out, transposed=transposed, config=config)
    assert torch.equal(out, out.mT), "Gram matrix is not exactly symmetric"
    assert_close_to_reference(out, gram64(z, transposed), what="X X^T")


def test_gram_folds_normalization_and_reads_fp32():
    # fp32 input is rounded to bf16 on load; s = 1/(sqrt(fro_sumsq)+eps) enters squared.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 21, 37, generator=g).to(DEVICE)
    sumsq = torch.tensor([3.0, 250.0], device=DEVICE)
    eps = 1e-3
    out = poison(2, 21, 21, dtype=torch.bfloat16, device=DEVICE)
    sym_gram(x, out, fro_sumsq=sumsq, eps=eps, config=SMALL)
    s = 1.0 / (sumsq.double().sqrt() + eps)
    want = gram64(x.to(torch.bfloat16), False) * (s * s)[:, None, None]
    assert torch.equal(out, out.mT)
    assert_close_to_reference(out, want, what="s^2 X X^T")


@pytest.mark.parametrize("d, config", [(23, SMALL), (40, None)])
def test_polynomial_fuses_bias(d, config):
    # B = c * A A + b * A on an exactly symmetric bf16 A (a Gram matrix, as in NS).
    z = bf16_input(2, d, 2 * d + 1, seed=2) / (2 * d) ** 0.5
    a_mat = poison(2, d, d, dtype=torch.bfloat16, device=DEVICE)
    sym_gram(z, a_mat, config=config)
    b, c = -6.8946, 2.9270
    out = poison(2, d, d, dtype=torch.bfloat16, device=DEVICE)
    sym_gram(a_mat, out, alpha=c, bias=a_mat, beta=b, config=config)
    a64 = a_mat.double()
    assert torch.equal(out, out.mT), "polynomial is not exactly symmetric"
    assert_close_to_reference(out, b * a64 + c * a64 @ a64, what="b A + c A A")


def test_polynomial_with_zero_alpha_is_the_scaled_bias():
    # The kernel starts from (beta / alpha) * D; alpha == 0 takes the no-product path.
    z = bf16_input(1, 20, 30, seed=5) / 30**0.5
    a_mat = poison(1, 20, 20, dtype=torch.bfloat16, device=DEVICE)
    sym_gram(z, a_mat, config=SMALL)
    out = poison(1, 20, 20, dtype=torch.bfloat16, device=DEVICE)
    sym_gram(a_mat, out, alpha=0.0, bias=a_mat, beta=-3.0, config=SMALL)
    assert torch.equal(out, (-3.0 * a_mat.float()).to(torch.bfloat16))
    with pytest.raises(ValueError, match="not both"):
        sym_gram(a_mat, out, bias=a_mat, fro_sumsq=torch.ones(1, device=DEVICE))


def test_strided_input_without_copy():
    # A column slice of a wider buffer: the kernel reads it through its strides.
    base = bf16_input(2, 19, 64, seed=3)
    z = base[:, :, 5:50]
    out = poison(2, 19, 19, dtype=torch.bfloat16, device=DEVICE)
    sym_gram(z, out, config=SMALL)
    assert_close_to_reference(out, gram64(z, False), what="strided X X^T")


def test_launches_only_upper_tiles():
    # The grid is B * T(T+1)/2 programs, not B * T^2.
    assert num_upper_tiles(33, 16) == 6
    assert num_upper_tiles(4096, 128) == 32 * 33 // 2


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter-only check of the upcast flag")
def test_interpreter_garbage_would_be_caught():
    # Without UPCAST the interpreter's bf16 tl.dot is garbage; the comparison above must
    # reject it (this guards the tests, not the kernel).
    assert interpreting()
    z = bf16_input(1, 16, 16, seed=4)
    out = poison(1, 16, 16, dtype=torch.bfloat16, device=DEVICE)
    _sym_gram_kernel[(1,)](
        z,
        out,
        out,
        out,
        16,
        16,
        1,
        *z.stride(),
        *out.stride(),
        *out.stride(),
        1.0,
        0.0,
        0.0,
        HAS_BIAS=False,
        HAS_SUMSQ=False,
        BLOCK=16,
        BLOCK_K=16,
        UPCAST=False,
    )
    with pytest.raises(AssertionError):
        assert_close_to_reference(out, gram64(z, False))
