"""Memory pass 1 of the fused step (docs/backends.md, stage 1), and the column-energy pass of
``energy_source="update"``.

``momentum_energy_pass_`` reads G and the float32 momentum M of a bucket of same-shape matrices
once and, in one launch (plus a tiny fixed-order reduction launch):

* updates M in place: M <- M + (1-b1)(G - M) (docs/rule.md, step 2; ``reference.momentum_update_``,
  torch's lerp form);
* writes the Newton-Schulz input X = ns_dtype(M), or of the Nesterov blend
  (``reference.nesterov_input``), optionally stored transposed for tall matrices;
* reduces the column energies E_j = sum_i S_ij^2 of S = M or S = G (docs/rule.md, step 7;
  ``reference.column_energy``);
* reduces ||X||_F^2 of the rounded X in float32 (what ``reference.newton_schulz`` divides by);
  where it overflows, the finalize scales that X in place by a power of two and sums again
  (``reference.overflow_scale``): no extra launch or pass on the normal path.

Column energies are saturated at the float32 maximum (``reference.saturate``).

``column_energy`` is the same column reduction for any stack (``energy_source="update"``: O with
a row scale, after Newton-Schulz).

The eager twin is ``reference.momentum_energy_pass_`` (and ``reference.update_energy``). Each
launcher has a ``prepare_*`` twin that returns its launches (the pass kernel and the fixed-order
finalize kernel) with every buffer allocated, for callers that replay them every step.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    FLOAT_DTYPES,
    FLT32_MAX,
    BucketLike,
    PassConfig,
    TensorBucket,
    check_dtype,
    check_no_overlap,
    check_same_device,
    check_shape,
    check_stack,
    default_config,
    device_fn,
    f32,
    fmix32,
    interpreting,
    matrix_base,
    next_pow2,
    out_or_new,
    props_for,
    round_to,
    saturate,
    sr_stream,
    stochastic_round_bf16,
    workspace_or_new,
)
from ._launch import DeviceProps, Launch, Prepared, TorchLaunch, public_op
from ._ns_jit import RESCALE_TILE, rescale_overflowed_

_SR_TWO_SUMS_MAXNREG = 96

# Energy sources of the rule (docs/rule.md, step 7): S = M, G or O_base. This pass computes
# the first two; "update" (O_base) exists only after Newton-Schulz (``column_energy``), and
# None computes none (an ungated matrix).
ENERGY_SOURCES = ("momentum", "grad", "update")
PASS1_ENERGY_SOURCES = ("momentum", "grad", None)
# Column-energy selector of the kernel (a constexpr).
_ENERGY_NONE, _ENERGY_MOMENTUM, _ENERGY_GRAD = 0, 1, 2
# Programs per SM the row-split heuristic aims for (a few waves hide the tail).
_PROGRAMS_PER_SM = 4


# --------------------------------------------------------------------------------------
# Device helpers of this pass
# --------------------------------------------------------------------------------------
@device_fn
def lerp(start, end, w, w_minus_1, SMALL: tl.constexpr):
    """torch.lerp(start, end, w) in float32, bit for bit as ATen's vectorized CPU kernel:
    fma(w, end - start, start) when |w| < 0.5, else fma(w - 1, end - start, end).
    ``w`` and ``w - 1`` come rounded from the host; SMALL = |w| < 0.5."""
    diff = end - start
    if SMALL:
        out = tl.fma(diff, w, start)
    else:
        out = tl.fma(diff, w_minus_1, end)
    return out


def lerp_weights(w: float) -> tuple[float, float, bool]:
    """(w, w - 1, |w| < 0.5) for ``lerp``, with w rounded to float32 first (torch's opmath)."""
    w32 = f32(w)
    return w32, f32(w32 - 1.0), abs(w32) < 0.5


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _momentum_energy_kernel(
    g_base, g_table, m_base, m_table, x_ptr, epart_ptr, fpart_ptr, npart_ptr,
    d_out, d_in, rows_per_split, n_splits, n_cb,
    sgb, sgr, sgc, smb, smr, smc, sxb, sxr, sxc,
    w, w_m1, nw, nw_m1,
    sr_key_ptr, sr_step_ptr, sr_row0, sr_col0, sr_d_in,
    G_TABLE: tl.constexpr, G_ALIGNED: tl.constexpr,
    M_TABLE: tl.constexpr, M_ALIGNED: tl.constexpr,
    SMALL_W: tl.constexpr, NESTEROV: tl.constexpr, SMALL_NW: tl.constexpr,
    ENERGY: tl.constexpr, INPUT_ENERGY: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr,
    SR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program: matrix b, a range of rows (a split), one block of columns. Column energies
    # and ||X||^2 are reduced over the split's rows in registers and written as partials that
    # _finalize_kernel adds in a fixed order (no atomics: bitwise reproducible).
    pid = tl.program_id(0)
    cb = pid % n_cb
    rest = pid // n_cb
    split = rest % n_splits
    b = rest // n_splits

    g_ptr = matrix_base(g_base, g_table, b, sgb, G_TABLE, G_ALIGNED)
    m_ptr = matrix_base(m_base, m_table, b, smb, M_TABLE, M_ALIGNED)
    x_mat = x_ptr + b.to(tl.int64) * sxb

    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < d_in
    cols64 = cols.to(tl.int64)
    e_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    f_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    n_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    if SR:
        # bf16 momentum: this matrix's random stream at its step, and each element's index in
        # the whole (out, in) matrix (a block starts at (sr_row0, sr_col0) of it).
        stream = sr_stream(tl.load(sr_key_ptr + b).to(tl.uint32, bitcast=True), tl.load(sr_step_ptr + b))
        sr_cols = sr_col0 + cols64
    r_start = split * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, d_out)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < d_out)[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        g = tl.load(g_ptr + rows64 * sgr + cols64[None, :] * sgc, mask=mask, other=0.0)
        g = g.to(tl.float32)  # all arithmetic in float32, as the reference (and bf16 is garbage in the interpreter)
        m_off = rows64 * smr + cols64[None, :] * smc
        m = tl.load(m_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
        m = lerp(m, g, w, w_m1, SMALL_W)
        if SR:  # stored rounded stochastically; everything below uses the float32 m
            index = ((sr_row0 + rows64) * sr_d_in + sr_cols[None, :]).to(tl.uint32)
            tl.store(m_ptr + m_off, stochastic_round_bf16(m, fmix32(index ^ stream)), mask=mask)
        else:
            tl.store(m_ptr + m_off, m, mask=mask)
        if NESTEROV:
            ns_in = lerp(g, m, nw, nw_m1, SMALL_NW)
        else:
            ns_in = m
        x = round_to(ns_in, x_ptr.dtype.element_ty, EMULATE_BF16_RNE)
        tl.store(x_mat + rows64 * sxr + cols64[None, :] * sxc, x, mask=mask)
        x32 = x.to(tl.float32)
        f_acc += x32 * x32  # masked elements are exact zeros
        if ENERGY == 1:
            e_acc += m * m
        elif ENERGY == 2:
            e_acc += g * g
        if INPUT_ENERGY:
            n_acc += ns_in * ns_in  # of the float32 Newton-Schulz input, before its rounding

    if INPUT_ENERGY:
        n = tl.sum(n_acc, axis=0)
        n_row = npart_ptr + (b.to(tl.int64) * n_splits + split) * d_in
        tl.store(n_row + cols64, n, mask=col_mask)
    if ENERGY != 0:
        e = tl.sum(e_acc, axis=0)
        e_row = epart_ptr + (b.to(tl.int64) * n_splits + split) * d_in
        tl.store(e_row + cols64, e, mask=col_mask)
    f = tl.sum(tl.sum(f_acc, axis=1), axis=0)
    tl.store(fpart_ptr + (b.to(tl.int64) * n_splits + split) * n_cb + cb, f)


@triton.jit
def _column_energy_kernel(
    s_ptr, rs_ptr, epart_ptr,
    d_out, d_in, rows_per_split, n_splits, n_cb,
    ssb, ssr, ssc, srb, srr,
    HAS_ROW_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # E_j = sum_i (rs_i * S_ij)^2 over a split of rows, as partials (see _momentum_energy_kernel).
    pid = tl.program_id(0)
    cb = pid % n_cb
    rest = pid // n_cb
    split = rest % n_splits
    b = rest // n_splits

    s_mat = s_ptr + b.to(tl.int64) * ssb
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < d_in
    cols64 = cols.to(tl.int64)
    e_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    r_start = split * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, d_out)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < d_out
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        s = tl.load(s_mat + rows64[:, None] * ssr + cols64[None, :] * ssc, mask=mask, other=0.0)
        s = s.to(tl.float32)
        if HAS_ROW_SCALE:
            rs = tl.load(rs_ptr + b.to(tl.int64) * srb + rows64 * srr, mask=row_mask, other=0.0)
            s = s * rs[:, None]  # O_base = O * rowscale, rounded to float32 like the reference
        e_acc += s * s
    e = tl.sum(e_acc, axis=0)
    e_row = epart_ptr + (b.to(tl.int64) * n_splits + split) * d_in
    tl.store(e_row + cols64, e, mask=col_mask)


@triton.jit
def _finalize_kernel(
    epart_ptr, fpart_ptr, e_ptr, f_ptr, x_ptr,
    d_out, d_in, n_splits, n_fpart, n_cb, seb, sej, sxb, sxr, sxc,
    HAS_ENERGY: tl.constexpr, HAS_SQNORM: tl.constexpr, RESCALE: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_F: tl.constexpr,
    RESCALE_R: tl.constexpr, RESCALE_C: tl.constexpr,
):
    # Second stage of the reductions: partials are added split by split, always in the same
    # order, so results do not depend on scheduling.
    pid = tl.program_id(0)
    cb = pid % n_cb
    b = pid // n_cb
    if HAS_ENERGY:
        cols = cb * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d_in
        cols64 = cols.to(tl.int64)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, n_splits):
            row = epart_ptr + (b.to(tl.int64) * n_splits + s) * d_in
            acc += tl.load(row + cols64, mask=mask, other=0.0)
        tl.store(e_ptr + b.to(tl.int64) * seb + cols64 * sej, saturate(acc), mask=mask)
    if HAS_SQNORM:
        if cb == 0:
            f_acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
            for start in range(0, n_fpart, BLOCK_F):
                offs = start + tl.arange(0, BLOCK_F)
                f_acc += tl.load(fpart_ptr + b.to(tl.int64) * n_fpart + offs, mask=offs < n_fpart, other=0.0)
            f = tl.sum(f_acc, axis=0)
            if RESCALE:
                if f > FLT32_MAX:  # ||X||^2 overflowed: scale this X down in place, sum again
                    f = rescale_overflowed_(x_ptr + b.to(tl.int64) * sxb, d_out, d_in, sxr, sxc,
                                            UPCAST, RESCALE_R, RESCALE_C)
            tl.store(f_ptr + b, f)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
def _zero_launches(*outputs: Tensor | None) -> list[TorchLaunch]:
    """Sums over no rows are zero: what a pass over an empty stack (an empty shard) writes."""
    return [TorchLaunch("zero", t.zero_, (t,)) for t in outputs if t is not None and t.numel()]


def _check_rounding(keys: Tensor | None, steps: Tensor | None, offset: tuple[int, int],
                    d_in: int | None, count: int, device: torch.device) -> None:
    """The arguments of a bf16 momentum's stochastic rounding (see
    ``prepare_momentum_energy_pass``)."""
    if keys is None or steps is None:
        raise TypeError("momentum has dtype torch.bfloat16; a bf16 momentum is stored with "
                        "stochastic rounding: pass sr_keys ((B,) int32) and sr_steps ((B,) "
                        "float32 or int32), or a float32 momentum")
    for name, t, dtypes in (("sr_keys", keys, (torch.int32,)),
                            ("sr_steps", steps, (torch.float32, torch.int32))):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        check_shape(name, t, (count,))
        check_dtype(name, t, dtypes)
        check_same_device(name, t, device)
    if len(offset) != 2 or any(not isinstance(v, int) or v < 0 for v in offset):
        raise ValueError(f"sr_offset must be two ints >= 0, got {offset!r}")
    if d_in is not None and (not isinstance(d_in, int) or d_in < 1):
        raise ValueError(f"sr_d_in must be None or an int >= 1, got {d_in!r}")


class MomentumEnergyResult(NamedTuple):
    x: Tensor  # (B, d_out, d_in) ns_dtype: the Newton-Schulz input (maybe stored transposed)
    energy: Tensor | None  # (B, d_in) float32 column energies, or None
    x_sqnorm: Tensor  # (B,) float32: ||X||_F^2 of the rounded X
    input_energy: Tensor | None = None  # (B, d_in) float32 column energies of the float32 input


def _splits(
    config: PassConfig, count: int, d_out: int, n_cb: int, props: DeviceProps
) -> tuple[int, int]:
    """(row splits, rows per split): enough programs to fill the GPU a few times over
    (``_PROGRAMS_PER_SM`` per SM of ``props``), each split a whole number of row blocks."""
    row_blocks = triton.cdiv(d_out, config.block_r)
    if config.splits is not None:
        splits = min(config.splits, row_blocks)
    else:
        target = _PROGRAMS_PER_SM * props.sm_count
        splits = max(1, min(row_blocks, triton.cdiv(target, count * n_cb)))
    rows_per_split = triton.cdiv(row_blocks, splits) * config.block_r
    return triton.cdiv(d_out, rows_per_split), rows_per_split


def pass_workspace_size(
    count: int, d_out: int, d_in: int, config: PassConfig, props: DeviceProps, *,
    energy: bool, sqnorm: bool, input_energy: bool = False,
) -> int:
    """float32 elements of the partial sums a column-reducing pass needs: (B, splits, d_in)
    energy partials (twice with ``input_energy``) and (B, splits, column blocks) ||X||^2
    partials."""
    n_cb = triton.cdiv(d_in, config.block_c)
    n_splits, _ = _splits(config, count, d_out, n_cb, props)
    columns = (d_in if energy else 0) + (d_in if input_energy else 0)
    return count * n_splits * (columns + (n_cb if sqnorm else 0))


def _finalize_launch(
    epart: Tensor | None, fpart: Tensor | None, energy: Tensor | None, sqnorm: Tensor | None,
    count: int, d_in: int, n_splits: int, n_fpart: int, x: Tensor | None = None,
) -> Launch:
    """The fixed-order finalize; given the Newton-Schulz input ``x`` (B, d_out, d_in) with
    ``sqnorm``, it rescales each X whose ||X||_F^2 overflowed (``rescale_overflowed_``)."""
    block = min(1024, next_pow2(d_in))
    n_cb = triton.cdiv(d_in, block) if energy is not None else 1
    # Unused pointer arguments get any live tensor; the constexpr flags keep them untouched.
    any_t = epart if epart is not None else fpart
    sx = x.stride() if x is not None else (0, 0, 0)
    return Launch(
        _finalize_kernel,
        (count * n_cb,),
        (
            any_t if epart is None else epart,
            any_t if fpart is None else fpart,
            any_t if energy is None else energy,
            any_t if sqnorm is None else sqnorm,
            any_t if x is None else x,
            x.shape[1] if x is not None else 0, d_in, n_splits, n_fpart, n_cb,
            energy.stride(0) if energy is not None else 0,
            energy.stride(1) if energy is not None else 0,
            sx[0], sx[1], sx[2],
        ),
        dict(
            HAS_ENERGY=energy is not None, HAS_SQNORM=sqnorm is not None,
            RESCALE=sqnorm is not None and x is not None, UPCAST=interpreting(),
            BLOCK=block, BLOCK_F=min(1024, next_pow2(max(n_fpart, 1))),
            RESCALE_R=RESCALE_TILE[0], RESCALE_C=RESCALE_TILE[1],
            num_warps=4, enable_fp_fusion=False,
        ),
    )


def prepare_momentum_energy_pass(
    grad: BucketLike,
    momentum: BucketLike,
    beta: float,
    *,
    nesterov: bool = False,
    energy_source: str | None = "momentum",
    ns_dtype: torch.dtype = torch.bfloat16,
    transpose_tall: bool = False,
    x_out: Tensor | None = None,
    energy_out: Tensor | None = None,
    sqnorm_out: Tensor | None = None,
    input_energy_out: Tensor | None = None,
    input_energy: bool = False,
    rescale_overflow: bool = True,
    workspace: Tensor | None = None,
    config: PassConfig | None = None,
    props: DeviceProps | None = None,
    sr_keys: Tensor | None = None,
    sr_steps: Tensor | None = None,
    sr_offset: tuple[int, int] = (0, 0),
    sr_d_in: int | None = None,
) -> Prepared:
    """Memory pass 1 (docs/backends.md, stage 1) for a bucket of B same-shape matrices: the pass
    and the fixed-order finalize of its partial sums. ``result`` is the
    ``MomentumEnergyResult`` ``(x, energy, x_sqnorm, input_energy)``; outputs and partials
    are allocated here when not given. Eager twin: ``reference.momentum_energy_pass_``.

    ``grad``: (B, d_out, d_in) fp32/bf16/fp16 stack or list of 2D tensors. ``momentum``: same
    shape, float32, stack or list; updated in place. ``beta``: b1. ``nesterov``: X is built from
    (1-b1)*G + b1*M instead of M. ``energy_source``: "momentum", "grad" or None (no energies:
    for "update" call ``column_energy`` after Newton-Schulz). ``ns_dtype``: dtype of X.
    ``transpose_tall``: for d_out > d_in, store X as the contiguous (B, d_in, d_out) matrix that
    Newton-Schulz iterates on; the returned ``x`` is always indexed (B, d_out, d_in) (then a
    ``.mT`` view), so ``x.mT`` is the pre-transposed contiguous operand. ``x_out``: a
    (B, d_out, d_in) tensor of ``ns_dtype`` with any strides to write X into. ``workspace``:
    optional preallocated contiguous float32 partials of at least ``pass_workspace_size(...)``
    elements. ``props``: the device the config is chosen for (default: ``grad``'s).
    ``input_energy`` (or ``input_energy_out``, (B, d_in) float32): also the column energies of
    the float32 Newton-Schulz input (M, or the Nesterov blend) before it is rounded to
    ``ns_dtype`` (NAMO's ||N_:,j||^2), in a second fixed-order finalize. ``rescale_overflow``:
    where ||X||_F^2 overflows float32, scale that X in place by a power of two and return the
    sum of the scaled X (``reference.overflow_scale``); off for a block of a matrix's rows (a
    row shard), whose Newton-Schulz normalizes the whole assembled matrix instead (where
    ||X||_F^2 may then be inf and is not used).

    A bf16 ``momentum`` (``state_dtype=torch.bfloat16``) is widened to float32, updated there,
    and stored rounded stochastically (``_common.stochastic_round_bf16``); X, the energies and
    the Nesterov blend use the float32 value. Its random bits need ``sr_keys`` ((B,) int32:
    each matrix's ``reference.sr_matrix_key`` as a bit pattern), ``sr_steps`` ((B,) float32
    or int32 device tensor: each matrix's step t), and for a block of a larger matrix
    ``sr_offset`` (its first row and column there) and ``sr_d_in`` (that matrix's columns);
    the twin is ``reference.momentum_energy_pass_(..., rounding=StochasticRounding(...))``.
    """
    g = TensorBucket.of(grad, "grad", props)
    m = TensorBucket.of(momentum, "momentum", props)
    check_dtype("grad", g.base, FLOAT_DTYPES)
    check_dtype("momentum", m.base, (torch.float32, torch.bfloat16))
    if m.count != g.count or m.shape != g.shape:
        raise ValueError(
            f"momentum holds {m.count} matrices of {m.shape}, but grad holds {g.count} of {g.shape}"
        )
    check_same_device("momentum", m.base, g.device)
    sr = m.dtype == torch.bfloat16
    if sr:
        _check_rounding(sr_keys, sr_steps, sr_offset, sr_d_in, m.count, g.device)
    if not m.uses_table:
        check_no_overlap("momentum", m.base)
    if energy_source not in PASS1_ENERGY_SOURCES:
        hint = (
            "; 'update' energies are computed after Newton-Schulz with column_energy(ortho, row_scale=rowscale)"
            if energy_source == "update"
            else ""
        )
        raise ValueError(f"energy_source must be one of {PASS1_ENERGY_SOURCES}, got {energy_source!r}{hint}")
    if ns_dtype not in FLOAT_DTYPES:
        raise TypeError(f"ns_dtype must be one of {FLOAT_DTYPES}, got {ns_dtype!r}")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool):
        raise TypeError(f"beta must be a float, got {type(beta).__name__}")
    props = props_for(g.base, props)
    if config is None:
        config = default_config(*g.shape, props=props, reduces_columns=True)
        if sr and (input_energy or input_energy_out is not None) and config.block_r > 1:
            # bf16 momentum (the rounding's hash) with two column sums (NAMO's): at 16 values
            # per thread this spilled on sm_90; half the rows keeps 8 per thread.
            config = dataclasses.replace(config, block_r=config.block_r // 2)
    # The same variant from fp32 params: Triton 3.6's ptxas picked 80 registers (three blocks
    # per SM) and spilled 8 bytes; a cap of 96 gives it 88, no spill, two blocks.
    maxnreg = _SR_TWO_SUMS_MAXNREG if sr and (input_energy or input_energy_out is not None) else None
    config.check()

    count, (d_out, d_in) = g.count, g.shape
    device = g.device
    if x_out is None:
        if transpose_tall and d_out > d_in:
            x_out = torch.empty((count, d_in, d_out), dtype=ns_dtype, device=device).mT
        else:
            x_out = torch.empty((count, d_out, d_in), dtype=ns_dtype, device=device)
    else:
        x_out = out_or_new("x_out", x_out, (count, d_out, d_in), ns_dtype, device)
    energy = None
    if energy_source is not None:
        energy = out_or_new("energy_out", energy_out, (count, d_in), torch.float32, device)
    sqnorm = out_or_new("sqnorm_out", sqnorm_out, (count,), torch.float32, device)
    n_energy = None
    if input_energy or input_energy_out is not None:
        n_energy = out_or_new("input_energy_out", input_energy_out, (count, d_in), torch.float32, device)
    result = MomentumEnergyResult(x_out, energy, sqnorm, n_energy)
    if count == 0 or d_out == 0 or d_in == 0:  # e.g. an empty row shard: its sums are zero
        return Prepared(_zero_launches(energy, sqnorm, n_energy), result)

    n_cb = triton.cdiv(d_in, config.block_c)
    n_splits, rows_per_split = _splits(config, count, d_out, n_cb, props)
    need = pass_workspace_size(count, d_out, d_in, config, props, energy=energy is not None,
                               sqnorm=True, input_energy=n_energy is not None)
    parts = workspace_or_new("workspace", workspace, need, device)
    n_epart = count * n_splits * d_in if energy is not None else 0
    n_npart = count * n_splits * d_in if n_energy is not None else 0
    epart = parts[:n_epart].view(count, n_splits, d_in) if energy is not None else None
    npart = parts[n_epart:n_epart + n_npart].view(count, n_splits, d_in) if n_energy is not None else None
    fpart = parts[n_epart + n_npart:].view(count, n_splits, n_cb)
    w, w_m1, small_w = lerp_weights(1.0 - beta)
    nw, nw_m1, small_nw = lerp_weights(beta)
    sg, sm, sx = g.strides, m.strides, x_out.stride()
    launch = Launch(
        _momentum_energy_kernel,
        (count * n_splits * n_cb,),
        (
            g.base, g.table if g.uses_table else g.base,
            m.base, m.table if m.uses_table else m.base,
            x_out, epart if epart is not None else fpart, fpart,
            npart if npart is not None else fpart,
            d_out, d_in, rows_per_split, n_splits, n_cb,
            sg[0], sg[1], sg[2], sm[0], sm[1], sm[2], sx[0], sx[1], sx[2],
            w, w_m1, nw, nw_m1,
            sr_keys if sr else fpart, sr_steps if sr else fpart,
            sr_offset[0] if sr else 0, sr_offset[1] if sr else 0,
            (d_in if sr_d_in is None else sr_d_in) if sr else 0,
        ),
        dict(
            G_TABLE=g.uses_table, G_ALIGNED=g.aligned, M_TABLE=m.uses_table, M_ALIGNED=m.aligned,
            SMALL_W=small_w, NESTEROV=bool(nesterov), SMALL_NW=small_nw,
            ENERGY={"momentum": _ENERGY_MOMENTUM, "grad": _ENERGY_GRAD, None: _ENERGY_NONE}[energy_source],
            INPUT_ENERGY=n_energy is not None, EMULATE_BF16_RNE=interpreting(), SR=sr,
            BLOCK_R=config.block_r, BLOCK_C=config.block_c,
            num_warps=config.num_warps, enable_fp_fusion=False,
            **({"maxnreg": maxnreg} if maxnreg and props.is_cuda else {}),
        ),
        keepalive=(g, m, sr_keys, sr_steps),
    )
    launches = [launch, _finalize_launch(epart, fpart, energy, sqnorm, count, d_in, n_splits,
                                         n_splits * n_cb, x_out if rescale_overflow else None)]
    if n_energy is not None:
        launches.append(_finalize_launch(npart, None, n_energy, None, count, d_in, n_splits, 0))
    return Prepared(launches, result)


momentum_energy_pass_ = public_op(prepare_momentum_energy_pass, "momentum_energy_pass_")


def prepare_column_energy(
    source: Tensor,
    *,
    row_scale: Tensor | None = None,
    out: Tensor | None = None,
    workspace: Tensor | None = None,
    config: PassConfig | None = None,
    props: DeviceProps | None = None,
) -> Prepared:
    """E_j = sum_i (rs_i * S_ij)^2 in float32 for a (B, d_out, d_in) stack of any strides and
    dtype fp32/bf16/fp16; ``row_scale`` (B, d_out) float32 or None (rs = 1). ``result`` is
    the (B, d_in) float32 energy (written into ``out`` when given). The launches: the pass and
    the fixed-order finalize of its partial sums.

    With ``source`` = Newton-Schulz output O and ``row_scale`` = 1/(sqrt(v)+eps) this is the
    ``energy_source="update"`` energy of O_base (eager twin: ``reference.update_energy``);
    without a row scale it is ``reference.column_energy``. ``workspace``: optional
    preallocated float32 partials (``pass_workspace_size(..., energy=True, sqnorm=False)``).
    """
    check_stack("source", source, props)
    count, d_out, d_in = source.shape
    device = source.device
    if row_scale is not None:
        if not isinstance(row_scale, Tensor):
            raise TypeError(f"row_scale must be a tensor or None, got {type(row_scale).__name__}")
        check_shape("row_scale", row_scale, (count, d_out))
        check_dtype("row_scale", row_scale, (torch.float32,))
        check_same_device("row_scale", row_scale, device)
    energy = out_or_new("out", out, (count, d_in), torch.float32, device)
    props = props_for(source, props)
    config = config or default_config(d_out, d_in, props=props, reduces_columns=True)
    config.check()
    if count == 0 or d_out == 0 or d_in == 0:
        return Prepared(_zero_launches(energy), energy)
    n_cb = triton.cdiv(d_in, config.block_c)
    n_splits, rows_per_split = _splits(config, count, d_out, n_cb, props)
    need = pass_workspace_size(count, d_out, d_in, config, props, energy=True, sqnorm=False)
    epart = workspace_or_new("workspace", workspace, need, device).view(count, n_splits, d_in)
    ss = source.stride()
    rs = row_scale if row_scale is not None else epart
    launch = Launch(
        _column_energy_kernel,
        (count * n_splits * n_cb,),
        (
            source, rs, epart,
            d_out, d_in, rows_per_split, n_splits, n_cb,
            ss[0], ss[1], ss[2],
            row_scale.stride(0) if row_scale is not None else 0,
            row_scale.stride(1) if row_scale is not None else 0,
        ),
        dict(
            HAS_ROW_SCALE=row_scale is not None,
            BLOCK_R=config.block_r, BLOCK_C=config.block_c,
            num_warps=config.num_warps, enable_fp_fusion=False,
        ),
    )
    finalize = _finalize_launch(epart, None, energy, None, count, d_in, n_splits, 0)
    return Prepared([launch, finalize], energy)


column_energy = public_op(prepare_column_energy, "column_energy")


__all__ = [
    "ENERGY_SOURCES",
    "PASS1_ENERGY_SOURCES",
    "MomentumEnergyResult",
    "column_energy",
    "momentum_energy_pass_",
    "pass_workspace_size",
    "prepare_column_energy",
    "prepare_momentum_energy_pass",
]
