"""Per-matrix sum of squares ||bf16(X)||_F^2 of a stack (the Newton–Schulz normalization).

In the fused optimizer step the momentum pass (docs/backends.md, stage 1) already
reduces this and hands it to ``newton_schulz(..., fro_sumsq=...)``; this small reduction is
what the NS launcher runs when it is not given. Values are rounded to bf16 before squaring
(the NS input is X = bf16(M)), squares are accumulated in fp32.

Deterministic, no atomics: each program reduces a block of ROWS rows of one matrix to one
partial sum in ``partials[b, row_tile]``; one small finish kernel adds the partials in a
fixed order (or the kernel writes the result directly when a matrix has one row tile).

Overflow: where a matrix's sum overflows float32, the program that writes it (the finish
kernel, or the partials kernel when one row tile covers the matrix) scales that matrix in
place by a power of two (``_ns_jit.rescale_overflowed_``, ``reference.overflow_scale``) and
writes the finite sum of the scaled matrix: NS is scale invariant, so O is the same, and
the normal path pays nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLT32_MAX, check_device, interpreting, props_for, workspace_or_new
from ._launch import DeviceProps, Launch, Prepared, TorchLaunch, public_op
from ._ns_jit import RESCALE_TILE, as_f32, rescale_overflowed_, tile_offset


@triton.jit
def _fro_sumsq_kernel(
    x_ptr,
    p_ptr,
    n_rows,
    n_cols,
    row_tiles,
    stride_xb,
    stride_xr,
    stride_xc,
    stride_pb,
    stride_pt,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    UPCAST: tl.constexpr,
    RESCALE_R: tl.constexpr,
    RESCALE_C: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = pid // row_tiles
    rt = pid - batch * row_tiles
    row0 = rt * ROWS
    offs_r = tl.arange(0, ROWS)
    offs_c = tl.arange(0, BLOCK_C)
    r_ok = (row0 + offs_r) < n_rows
    ptrs = (
        x_ptr
        + tile_offset(batch, stride_xb, row0, stride_xr, 0, stride_xc)
        + (offs_r[:, None] * stride_xr + offs_c[None, :] * stride_xc)
    )
    acc = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        mask = r_ok[:, None] & ((c0 + offs_c) < n_cols)[None, :]
        x = as_f32(tl.load(ptrs, mask=mask, other=0.0), UPCAST)
        acc += x * x
        ptrs += BLOCK_C * stride_xc
    total = tl.sum(tl.sum(acc, axis=1), axis=0)
    if row_tiles == 1:
        if total > FLT32_MAX:  # this program owns the whole matrix: rescale it here
            total = rescale_overflowed_(x_ptr + tile_offset(batch, stride_xb, 0, 0, 0, 0), n_rows,
                                        n_cols, stride_xr, stride_xc, UPCAST, RESCALE_R, RESCALE_C)
    tl.store(p_ptr + tile_offset(batch, stride_pb, rt, stride_pt, 0, 0), total)


@triton.jit
def _fro_finish_kernel(
    x_ptr, p_ptr, out_ptr, n_rows, n_cols, row_tiles,
    stride_xb, stride_xr, stride_xc,
    UPCAST: tl.constexpr, BLOCK_T: tl.constexpr,
    RESCALE_R: tl.constexpr, RESCALE_C: tl.constexpr,
):
    # One program per matrix: the partials in a fixed order, then the rare rescale.
    batch = tl.program_id(0)
    offs = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for t0 in range(0, row_tiles, BLOCK_T):
        tiles = t0 + offs
        acc += tl.load(p_ptr + batch.to(tl.int64) * row_tiles + tiles, mask=tiles < row_tiles, other=0.0)
    total = tl.sum(acc, axis=0)
    if total > FLT32_MAX:
        total = rescale_overflowed_(x_ptr + tile_offset(batch, stride_xb, 0, 0, 0, 0), n_rows,
                                    n_cols, stride_xr, stride_xc, UPCAST, RESCALE_R, RESCALE_C)
    tl.store(out_ptr + batch, total)


def fro_sumsq_config(n_rows: int, n_cols: int, props: DeviceProps) -> tuple[int, int]:
    """(ROWS, BLOCK_C): 8 x 512 on a GPU (16 KiB of bf16 per iteration, one program per 8
    rows: thousands of programs for the benchmark shapes); 16 x 64 for the interpreter."""
    if not props.is_cuda:
        return 16, min(64, triton.next_power_of_2(max(1, n_cols)))
    return 8, min(512, max(16, triton.next_power_of_2(max(1, n_cols))))


def fro_sumsq_partial_size(batch: int, n_rows: int, n_cols: int, props: DeviceProps) -> int:
    """Elements of the partial-sum buffer ``fro_sumsq`` needs (0: it writes ``out`` directly)."""
    rows, _ = fro_sumsq_config(n_rows, n_cols, props)
    tiles = triton.cdiv(n_rows, rows)
    return 0 if tiles == 1 else batch * tiles


def prepare_fro_sumsq(
    x: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    partials: torch.Tensor | None = None,
    props: DeviceProps | None = None,
) -> Prepared:
    """sum_ij bf16(x)_ij^2 per matrix of a (B, m, n) stack (any float dtype, any strides):
    ``result`` is ``out``, the (B,) float32 sums. Where that sum overflows float32, the matrix
    is first scaled in place by a power of two (see the module docstring) and the sum is that
    of the scaled matrix. The launches: the partial sums kernel and, with several row tiles,
    the finish kernel over the partials.

    out: optional (B,) fp32 result buffer (allocated here when not given). partials: optional
    preallocated contiguous fp32 buffer of at least ``fro_sumsq_partial_size(...)`` elements
    (allocated here when needed and not given). ``props``: the device the config is chosen
    for (default: ``x``'s).
    """
    check_device("x", x, props)
    if x.ndim != 3:
        raise ValueError(f"fro_sumsq expects a (B, m, n) stack, got shape {tuple(x.shape)}")
    batch, m, n = x.shape
    if out is None:
        out = torch.empty(batch, device=x.device, dtype=torch.float32)
    elif out.shape != (batch,) or out.dtype != torch.float32:
        raise ValueError(f"out must be a float32 tensor of shape {(batch,)}")
    if batch == 0:
        return Prepared([], out)
    if m == 0 or n == 0:
        return Prepared([TorchLaunch("zero_fro_sumsq", out.zero_, (out,))], out)
    props = props_for(x, props)
    rows, block_c = fro_sumsq_config(m, n, props)
    row_tiles = triton.cdiv(m, rows)
    if row_tiles == 1:
        target = out.unsqueeze(1)
    else:
        need = fro_sumsq_partial_size(batch, m, n, props)
        target = workspace_or_new("partials", partials, need, x.device).view(batch, row_tiles)
    launches: list = [
        Launch(
            _fro_sumsq_kernel,
            (batch * row_tiles,),
            (
                x, target, m, n, row_tiles,
                x.stride(0), x.stride(1), x.stride(2), target.stride(0), target.stride(1),
            ),
            dict(ROWS=rows, BLOCK_C=block_c, UPCAST=interpreting(),
                 RESCALE_R=RESCALE_TILE[0], RESCALE_C=RESCALE_TILE[1], num_warps=4),
        )
    ]
    if row_tiles > 1:
        launches.append(Launch(
            _fro_finish_kernel,
            (batch,),
            (x, target, out, m, n, row_tiles, x.stride(0), x.stride(1), x.stride(2)),
            dict(UPCAST=interpreting(), BLOCK_T=min(1024, triton.next_power_of_2(row_tiles)),
                 RESCALE_R=RESCALE_TILE[0], RESCALE_C=RESCALE_TILE[1], num_warps=4),
        ))
    return Prepared(launches, out)


fro_sumsq = public_op(prepare_fro_sumsq, "fro_sumsq")
