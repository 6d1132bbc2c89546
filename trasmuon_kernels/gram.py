"""Symmetric product C = alpha * s^2 * Z Z^T + beta * D for a stack of matrices (docs/rule.md, step 3).

The two symmetric products of one Newton–Schulz step are both this kernel:

* the Gram matrix ``A = X X^T`` (``alpha = 1``, no ``D``); on the first step ``s`` is the
  Frobenius normalization 1 / (sqrt(fro_sumsq[b]) + eps) folded in (``fro_sumsq=``), and
  for a tall input the kernel reads X^T X straight from the untransposed matrix
  (``transposed=True``: the rows of Z are the columns of the stored matrix, read with
  swapped strides; no transpose copy);
* the polynomial ``B = b*A + c*A A`` (``alpha = c``, ``D = A``, ``beta = b``): A is exactly
  symmetric, so A A = A A^T and the b*A term is added in the epilogue.

Only the T(T+1)/2 upper-triangle tiles (ti <= tj) of the T x T tile grid are launched: the
program id is mapped to (ti, tj) in closed form (``_ns_jit.upper_tile``), there is no full
grid with early exits. Each program rounds its tile to bf16 once; an off-diagonal program
writes the tile and the transpose of the same bf16 values at (tj, ti), a diagonal one takes
the lower half of its tile from the transpose of its upper half. The output is therefore
exactly symmetric (``torch.equal(C, C.mT)``), with or without ``D`` (``D`` must itself be
exactly symmetric, which the first product guarantees). The mirror works on the bf16 tile,
never on the fp32 accumulator, and its store masks are whole rows of the tile (16-byte
stores); the 128x128 configs cap registers at 128 per thread (``maxnreg``), so two blocks
of 8 warps share an SM (docs/kernels-newton-schulz.md, "Compiled for sm_90").

fp32 accumulation, one rounding of the result to bf16 (round to nearest even), like
``torch.bmm``/``torch.baddbmm`` in bf16. Launch: one program per (matrix, upper tile), all
matrices of the stack in one launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import check_device, interpreting, props_for
from ._launch import DeviceProps, Launch, Prepared, public_op
from ._ns_jit import as_f32, dot_k_loop, round_to_bf16, tile_offset, upper_tile


@dataclass(frozen=True)
class GramConfig:
    """Tile config of the symmetric product: square BLOCK x BLOCK output tiles (the mirror
    needs square tiles), BLOCK_K of the inner dimension per iteration. ``maxnreg``: a cap on
    registers per thread (ptxas ``.maxnreg``), None for the compiler's choice."""

    block: int
    block_k: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None


@triton.jit
def _sym_gram_kernel(
    z_ptr,
    d_ptr,
    c_ptr,
    sumsq_ptr,
    n_rows,
    n_inner,
    n_tri,
    stride_zb,
    stride_zr,
    stride_zk,
    stride_db,
    stride_dr,
    stride_dc,
    stride_cb,
    stride_cr,
    stride_cc,
    alpha,
    d_scale,
    eps,
    HAS_BIAS: tl.constexpr,
    HAS_SUMSQ: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = pid // n_tri
    ti, tj = upper_tile(pid - batch * n_tri)
    row0 = ti * BLOCK
    col0 = tj * BLOCK
    offs = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = (row0 + offs) < n_rows
    col_ok = (col0 + offs) < n_rows

    # Z[row0 + i, k] as a (BLOCK, BLOCK_K) tile and Z[col0 + j, k] as a (BLOCK_K, BLOCK) tile.
    a_ptrs = (
        z_ptr
        + tile_offset(batch, stride_zb, row0, stride_zr, 0, stride_zk)
        + (offs[:, None] * stride_zr + offs_k[None, :] * stride_zk)
    )
    b_ptrs = (
        z_ptr
        + tile_offset(batch, stride_zb, col0, stride_zr, 0, stride_zk)
        + (offs_k[:, None] * stride_zk + offs[None, :] * stride_zr)
    )
    if HAS_SUMSQ:
        # Before the loop, while few registers are live: the IEEE sqrt and division expand to
        # long sequences that, after it, pushed the epilogue over 128 registers.
        s = 1.0 / (tl.sqrt_rn(tl.load(sumsq_ptr + batch).to(tl.float32)) + eps)
    if HAS_BIAS:
        # beta * D enters as the accumulator's initial value, divided by alpha (d_scale =
        # beta / alpha, from the launcher), so that the epilogue holds nothing but the
        # accumulator: alpha * (d_scale * D + Z Z^T) = alpha * Z Z^T + beta * D.
        d_ptrs = (
            d_ptr
            + tile_offset(batch, stride_db, row0, stride_dr, col0, stride_dc)
            + (offs[:, None] * stride_dr + offs[None, :] * stride_dc)
        )
        dval = tl.load(d_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = as_f32(dval, UPCAST) * d_scale
    else:
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    acc = dot_k_loop(acc, a_ptrs, b_ptrs, stride_zk, stride_zk, row_ok, col_ok, offs_k, n_inner,
                     BLOCK_K, UPCAST)

    # Epilogue: the normalization folded in, alpha, one rounding, symmetrize, mirror.
    if HAS_SUMSQ:
        acc = (acc * s) * s
    acc = acc * alpha
    c16 = round_to_bf16(acc, UPCAST)

    # The mirror works on the bf16 values, never on the fp32 accumulator (a transposed fp32
    # copy held 64 more registers per thread: 207-209 in all, one block per SM). A diagonal
    # tile takes its lower half from the transpose of its upper half; every tile is written at
    # (ti, tj) and, off the diagonal, again through transposed addresses at (tj, ti): the same
    # bf16 values, so C is exactly symmetric. Masks are whole rows/columns of the tile (no
    # triangle), so both stores stay 16-byte vectors.
    # (Conditions as vectors: the interpreter turns a block & a scalar condition into int32.)
    off_diag = (offs * 0 + ti) != tj
    c16 = tl.where((~off_diag)[:, None] & (offs[:, None] > offs[None, :]), tl.trans(c16), c16)
    c_ptrs = (
        c_ptr
        + tile_offset(batch, stride_cb, row0, stride_cr, col0, stride_cc)
        + (offs[:, None] * stride_cr + offs[None, :] * stride_cc)
    )
    tl.store(c_ptrs, c16, mask=row_ok[:, None] & col_ok[None, :])
    # Element (i, j) of the tile also goes to C[col0 + j, row0 + i].
    ct_ptrs = (
        c_ptr
        + tile_offset(batch, stride_cb, col0, stride_cr, row0, stride_cc)
        + (offs[:, None] * stride_cc + offs[None, :] * stride_cr)
    )
    tl.store(ct_ptrs, c16, mask=(row_ok & off_diag)[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------
def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(1, n)))


# Registers per thread at which two blocks of 8 warps fit an SM (65536 / (2 * 256)): the
# 128x128 configs are capped there, so one block's epilogue overlaps the other's main loop.
TWO_BLOCKS_MAXNREG = 128


def num_upper_tiles(d: int, block: int) -> int:
    t = triton.cdiv(d, block)
    return t * (t + 1) // 2


def default_gram_config(batch: int, d: int, k: int, props: DeviceProps) -> GramConfig:
    """Heuristic tile config for a (batch, d, d) symmetric product with inner size k.

    GPU: 128x128 tiles (8 warps, 3 stages: 2 * 128*64 bf16 per stage, 96 KiB) when the
    triangle still fills the SMs, otherwise 64x64 (4 warps, 4 stages), and the smallest
    power of two >= 16 covering d for small matrices (tl.dot needs 16). BLOCK_K 64, capped
    to the inner size. Interpreter: the smallest of 16/32/64 covering d, BLOCK_K 64. The
    interpreter's cost is per program and per op, not per element (a 65x129 NS runs ~3x
    faster with 64 than with 32 tiles), so its tiles are not smaller than the GPU's for
    these shapes; tests that need several tiles (the mirror, the triangular mapping) pass
    explicit small configs.
    """
    if not props.is_cuda:
        block = 16 if d <= 16 else (32 if d <= 32 else 64)
        return GramConfig(
            block=block, block_k=min(64, _pow2_at_least(k)), num_warps=4, num_stages=1
        )
    block = min(64, _pow2_at_least(d))
    if d > 64 and batch * num_upper_tiles(d, 128) >= props.sm_count:
        block = 128
    block_k = min(64 if block >= 64 else 128, _pow2_at_least(k))
    if block == 128:
        return GramConfig(block=128, block_k=block_k, num_warps=8, num_stages=3, maxnreg=TWO_BLOCKS_MAXNREG)
    if block == 64:
        return GramConfig(block=64, block_k=block_k, num_warps=4, num_stages=4)
    return GramConfig(block=block, block_k=block_k, num_warps=2 if block == 16 else 4, num_stages=4)


def gram_candidates(d: int, k: int, props: DeviceProps) -> list[GramConfig]:
    """Configs the opt-in autotuner tries for this shape."""
    if not props.is_cuda:
        return [
            GramConfig(b, bk, 4, 1) for b in (16, 32) for bk in (16, 32) if b <= _pow2_at_least(d)
        ]
    out: list[GramConfig] = []
    for block, warps in ((32, 4), (64, 4), (128, 8), (128, 4)):
        block = min(block, _pow2_at_least(d))  # small matrices: one tile (never no candidate)
        for block_k in (32, 64, 128):
            block_k = min(block_k, _pow2_at_least(k))
            if block == 128 and block_k == 128:
                continue
            for stages in (3, 4):
                cfg = GramConfig(block, block_k, warps, stages)
                if cfg not in out:
                    out.append(cfg)
    return out


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def prepare_sym_gram(
    z: torch.Tensor,
    out: torch.Tensor,
    *,
    transposed: bool = False,
    alpha: float = 1.0,
    bias: torch.Tensor | None = None,
    beta: float = 0.0,
    fro_sumsq: torch.Tensor | None = None,
    eps: float = 0.0,
    config: GramConfig | None = None,
    props: DeviceProps | None = None,
) -> Prepared:
    """out = alpha * s^2 * Z Z^T + beta * bias, written for upper tiles and mirrored: one
    launch; ``result`` is ``out``.

    z: (B, d, k) of any float dtype (rounded to bf16 on load), any strides; with
    ``transposed=True`` z is (B, k, d) and Z = z^T (the product is z^T z, read without a
    copy). out: (B, d, d) bf16, fully overwritten, exactly symmetric. bias: (B, d, d),
    exactly symmetric (e.g. a previous output of this function). fro_sumsq: (B,) fp32 sums of
    squares; when given, s = 1 / (sqrt(fro_sumsq) + eps), else s = 1 (not together with
    ``bias``). ``props``: the device the default config is chosen for (default: ``z``'s)."""
    if z.ndim != 3 or out.ndim != 3:
        raise ValueError("sym_gram expects (B, d, k) inputs and a (B, d, d) output")
    check_device("z", z, props)
    zt = z.mT if transposed else z
    batch, d, k = zt.shape
    if out.shape != (batch, d, d) or out.dtype != torch.bfloat16:
        raise ValueError(
            f"out must be a bf16 tensor of shape {(batch, d, d)}, got {out.dtype} {tuple(out.shape)}"
        )
    if bias is not None and bias.shape != (batch, d, d):
        raise ValueError(f"bias must have shape {(batch, d, d)}")
    if fro_sumsq is not None and fro_sumsq.shape != (batch,):
        raise ValueError(f"fro_sumsq must have shape {(batch,)}")
    if bias is not None and fro_sumsq is not None:
        raise ValueError("sym_gram takes bias or fro_sumsq, not both (Newton-Schulz never needs both)")
    if batch == 0 or d == 0:
        return Prepared([], out)
    cfg = config or default_gram_config(batch, d, k, props_for(z, props))
    n_tri = num_upper_tiles(d, cfg.block)
    d_arg = bias if bias is not None else out
    s_arg = fro_sumsq if fro_sumsq is not None else out
    # The kernel starts its accumulator at (beta / alpha) * bias and scales by alpha at the
    # end; with alpha == 0 the product vanishes: no inner loop, the result is beta * bias.
    alpha, d_scale, n_inner = float(alpha), 0.0, k
    if bias is not None:
        if alpha != 0.0:
            d_scale = float(beta) / alpha
        else:
            alpha, d_scale, n_inner = 1.0, float(beta), 0
    launch = Launch(
        _sym_gram_kernel,
        (batch * n_tri,),
        (
            zt, d_arg, out, s_arg,
            d, n_inner, n_tri,
            zt.stride(0), zt.stride(1), zt.stride(2),
            d_arg.stride(0), d_arg.stride(1), d_arg.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            alpha, d_scale, float(eps),
        ),
        dict(
            HAS_BIAS=bias is not None,
            HAS_SUMSQ=fro_sumsq is not None,
            BLOCK=cfg.block,
            BLOCK_K=cfg.block_k,
            UPCAST=interpreting(),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
        ),
    )
    return Prepared([launch], out)


sym_gram = public_op(prepare_sym_gram, "sym_gram")
