"""``@triton.jit`` device helpers shared by the Newton–Schulz kernels.

Nothing here launches anything: these are inlined into the kernels of ``gram.py``,
``ns_apply.py``, ``fro_sumsq.py`` and ``momentum_energy.py`` (``device_fn``: jit helpers on
the GPU, plain functions under the interpreter, where each jit call costs milliseconds).

bf16 under the interpreter. Triton's CPU interpreter stores bf16 as raw uint16 bits and
computes bf16 arithmetic, ``tl.dot`` and ``tl.sum`` on those bits (garbage); its fp32 -> bf16
cast also truncates (round toward zero) instead of rounding to nearest even, and flushes fp32
subnormals. So every kernel takes an ``UPCAST`` constexpr (set from
``trasmuon_kernels._common.interpreting()``): when it is true, bf16 values are widened to
fp32 by a bit shift and fp32 values are rounded to bf16 by integer round-to-nearest-even on
the bits, so the interpreter reproduces the GPU's rounding bit for bit and the products run
as fp32 ``tl.dot`` with ``input_precision="ieee"``. When it is false (the GPU), the same
helpers are plain ``.to(tl.bfloat16)`` casts (``cvt.rn.bf16.f32``) and bf16 ``tl.dot`` with
fp32 accumulation.

Offsets. Matrix and tile origins are computed in int64 (``tile_offset``): ``batch * stride``
of a stack over 2^31 elements overflows int32 even when each stride fits in int32. In-tile
offsets (``tl.arange(0, BLOCK) * stride``) stay int32: they are bounded by BLOCK * stride,
far below 2^31 for any matrix whose rows are shorter than 2^23 elements.
"""

from __future__ import annotations

import triton.language as tl

from ._common import device_fn, round_to


@device_fn
def tile_offset(batch, stride_b, row0, stride_r, col0, stride_c):
    """Element offset of entry (row0, col0) of matrix ``batch``, computed in int64."""
    return (
        tl.cast(batch, tl.int64) * stride_b
        + tl.cast(row0, tl.int64) * stride_r
        + tl.cast(col0, tl.int64) * stride_c
    )


@device_fn
def upper_tile(t):
    """Map a linear index t in [0, T(T+1)/2) to the upper-triangle tile (ti, tj), ti <= tj.

    Column-major over the upper triangle: t = tj*(tj+1)/2 + ti, so consecutive programs
    share the column block tj (its operand tile stays hot in L2). tj is the floor of the
    root of tj^2 + tj - 2t = 0, computed in fp32 and corrected by one step either way (exact
    for any t < 2^31).
    """
    tj = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= t, tj + 1, tj)
    tj = tl.where(tj * (tj + 1) // 2 > t, tj - 1, tj)
    ti = t - tj * (tj + 1) // 2
    return ti, tj


@device_fn
def round_to_bf16(x, UPCAST: tl.constexpr):
    """fp32 (or any float) -> bf16, rounding to nearest even, on the GPU and the interpreter."""
    if x.dtype == tl.bfloat16:
        y = x
    elif UPCAST:
        xf = x.to(tl.float32)
        bits = xf.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(xf == xf, bits, 0x7FC0)  # keep NaN a NaN
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(tl.bfloat16)
    return y


@device_fn
def dot_operand(x, UPCAST: tl.constexpr):
    """A loaded tile as a ``tl.dot`` operand: bf16(x) on the GPU; the exact fp32 value of
    bf16(x) when interpreting (the interpreter's bf16 ``tl.dot`` is garbage).

    Written without nested helper calls: each jit call costs ~1 ms in the interpreter.
    """
    if UPCAST:
        if x.dtype == tl.bfloat16:
            bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        else:
            xf = x.to(tl.float32)
            bits = xf.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            bits = tl.where(xf == xf, rounded, bits)  # keep NaN a NaN
        y = bits.to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.bfloat16)
    return y


@device_fn
def as_f32(x, UPCAST: tl.constexpr):
    """The fp32 value of bf16(x): what an epilogue adds when it reads a bf16 operand (or an
    fp32 input that the NS semantics round to bf16 first)."""
    if UPCAST:
        y = dot_operand(x, UPCAST)
    else:
        y = x.to(tl.bfloat16).to(tl.float32)
    return y


@device_fn
def bf16_to_f32(x, UPCAST: tl.constexpr):
    """bf16 -> fp32 exactly (a bit shift under the interpreter)."""
    if UPCAST:
        y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@device_fn
def dot_k_loop(acc, a_ptrs, b_ptrs, a_step, b_step, rows_ok, cols_ok, offs_k, n_inner,
               BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """acc += A @ B over the inner dimension, BLOCK_K at a time: A tiles at ``a_ptrs``
    (rows x BLOCK_K, rows masked by ``rows_ok``), B tiles at ``b_ptrs`` (BLOCK_K x cols),
    both advanced by BLOCK_K * their inner-dimension stride. bf16 operands, fp32 accumulation
    (exact fp32 products of the bf16 values under the interpreter)."""
    for k0 in range(0, n_inner, BLOCK_K):
        k_ok = (k0 + offs_k) < n_inner
        a = dot_operand(tl.load(a_ptrs, mask=rows_ok[:, None] & k_ok[None, :], other=0.0), UPCAST)
        b = dot_operand(tl.load(b_ptrs, mask=k_ok[:, None] & cols_ok[None, :], other=0.0), UPCAST)
        if UPCAST:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * a_step
        b_ptrs += BLOCK_K * b_step
    return acc


# Tile of the rare in-place rescale of an overflowed matrix (one program walks the matrix).
RESCALE_TILE = (16, 128)


@device_fn
def _tile(r0, c0, offs_r, offs_c, n_rows, n_cols, s_r, s_c):
    """int64 offsets and mask of the (BLOCK_R, BLOCK_C) tile at (r0, c0) of a strided matrix."""
    rows = r0 + offs_r
    cols = c0 + offs_c
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows.to(tl.int64)[:, None] * s_r + cols.to(tl.int64)[None, :] * s_c, mask


@device_fn
def rescale_overflowed_(x_ptr, n_rows, n_cols, s_r, s_c,
                        UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The rare path of a Newton–Schulz input whose sum of squares overflowed float32
    (``reference.overflow_scale``): scales the matrix at ``x_ptr`` in place by 2^(128 - e), e
    the biased exponent of max|X|, which brings max|X| into [2, 4), and returns the new sum of
    squares of bf16(X). A power of two is exact (entries that underflow are far below the
    iteration's rounding) and NS is scale invariant: O is unchanged. Two passes over one
    matrix by one program: slow, but only a matrix that overflowed takes it."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    amax = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        for c0 in range(0, n_cols, BLOCK_C):
            offs, mask = _tile(r0, c0, offs_r, offs_c, n_rows, n_cols, s_r, s_c)
            x = as_f32(tl.load(x_ptr + offs, mask=mask, other=0.0), UPCAST)
            amax = tl.maximum(amax, tl.abs(x))
    top = tl.max(tl.max(amax, axis=1), axis=0)
    biased = (top.to(tl.int32, bitcast=True) >> 23) & 0xFF
    scale = ((255 - biased) << 23).to(tl.float32, bitcast=True)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        for c0 in range(0, n_cols, BLOCK_C):
            offs, mask = _tile(r0, c0, offs_r, offs_c, n_rows, n_cols, s_r, s_c)
            raw = tl.load(x_ptr + offs, mask=mask, other=0.0)
            if raw.dtype == tl.bfloat16:
                x = bf16_to_f32(raw, UPCAST) * scale
            else:
                x = raw.to(tl.float32) * scale
            tl.store(x_ptr + offs, round_to(x, x_ptr.dtype.element_ty, UPCAST), mask=mask)
            x = as_f32(x, UPCAST)
            acc += x * x
    return tl.sum(tl.sum(acc, axis=1), axis=0)
