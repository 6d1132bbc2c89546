"""Device helpers of the Newton–Schulz kernels (trasmuon_kernels/_ns_jit.py).

* ``tile_offset`` computes matrix/tile origins in int64: checked here on values whose int32
  product wraps (the interpreter wraps int32 arithmetic like the GPU does).
* ``upper_tile`` maps program ids onto the upper triangle of the tile grid: a bijection.
* ``round_to_bf16`` / ``dot_operand`` / ``as_f32`` reproduce torch's round-to-nearest-even
  bf16 conversion bit for bit (under the interpreter that is the integer emulation; on a GPU
  the hardware conversion).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from trasmuon_kernels._common import interpreting
from trasmuon_kernels._ns_jit import as_f32, dot_operand, round_to_bf16, tile_offset, upper_tile

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _offset_probe(out_ptr, batch, stride_b, row0, stride_r, col0, stride_c):
    pid = tl.program_id(0)  # an int32 program id, as in the kernels
    tl.store(out_ptr + pid, tile_offset(pid + batch, stride_b, row0, stride_r, col0, stride_c))


@triton.jit
def _tile_probe(out_ptr):
    pid = tl.program_id(0)
    ti, tj = upper_tile(pid)
    tl.store(out_ptr + 2 * pid, ti)
    tl.store(out_ptr + 2 * pid + 1, tj)


@triton.jit
def _round_probe(x_ptr, r_ptr, f_ptr, g_ptr, n, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(r_ptr + offs, round_to_bf16(x, UPCAST), mask=mask)
    tl.store(f_ptr + offs, dot_operand(x, UPCAST).to(tl.float32), mask=mask)
    tl.store(g_ptr + offs, as_f32(x, UPCAST), mask=mask)


def test_interpreter_is_on_without_gpu():
    # The kernels' UPCAST flag comes from this: without it every bf16 product is garbage.
    assert interpreting() == (DEVICE == "cpu")


def test_tile_offset_is_int64():
    # Stack strides that fit in int32 but whose products with the batch index do not:
    # 3 * (2^30 + 3) and (2^31 - 1) * 2 both exceed 2^31 - 1.
    stride_b = 2**30 + 3
    out = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    _offset_probe[(2,)](out, 2, stride_b, 70_000, 40_000, 5, 1)
    want = [(2 + p) * stride_b + 70_000 * 40_000 + 5 for p in range(2)]
    assert min(want) > 2**31 and 70_000 * 40_000 > 2**31
    assert out.tolist() == want


@pytest.mark.parametrize("tiles", [1, 2, 5, 12])
def test_upper_tile_is_a_bijection(tiles):
    n = tiles * (tiles + 1) // 2
    out = torch.full((n, 2), -1, dtype=torch.int32, device=DEVICE)
    _tile_probe[(n,)](out)
    got = [tuple(p) for p in out.tolist()]
    # Column-major over the upper triangle: consecutive ids share the column tile tj.
    assert got == [(i, j) for j in range(tiles) for i in range(j + 1)]


@pytest.mark.parametrize("upcast", [True, False] if DEVICE == "cuda" else [True])
def test_bf16_rounding_matches_torch(upcast):
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.randn(3000, generator=g) * 10.0 ** torch.randint(-30, 30, (3000,), generator=g),
            # ties (exactly halfway between two bf16 values), both parities, and specials
            torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.3895314e38]),
            torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")]),
        ]
    ).to(DEVICE)
    n = x.numel()
    r = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    f = torch.empty(n, dtype=torch.float32, device=DEVICE)
    h = torch.empty(n, dtype=torch.float32, device=DEVICE)
    _round_probe[(1,)](x, r, f, h, n, BLOCK=triton.next_power_of_2(n), UPCAST=upcast)
    want = x.to(torch.bfloat16)
    finite = ~want.isnan()
    assert torch.equal(r[finite].view(torch.int16), want[finite].view(torch.int16))
    assert r[~finite].isnan().all()
    assert torch.equal(h[finite], want[finite].float())
    assert torch.equal(f[finite], want[finite].float())
