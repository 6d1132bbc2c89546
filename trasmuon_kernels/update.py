"""Stages 3 and 5 of the fused step (docs/backends.md): row statistics and the weight update pass.

* ``row_sumsq``: sum_j O_ij^2 in float32 for a (B, d_out, d_in) stack (``reference.row_sumsq``),
  for when Newton-Schulz's epilogue does not provide it. One read of O.
* ``row_stats_``: the tiny per-matrix vector math (docs/rule.md, steps 4-6):
  v <- b2*v + (1-b2)*mean_j O^2 in place, rowscale = 1/(sqrt(v)+eps), eta_hat =
  scale*lr*sqrt(d_out*d_in) / (||O_base||_F + eta_eps) with ||O_base||_F = sqrt(sum_i
  rowsumsq_i * rowscale_i^2), on device (``reference.row_stats_``).
* ``update_pass_``: memory pass 2, W <- (1 - lr*wd)*W - r_i * c_j * O_ij (docs/rule.md, steps 1
  and 12) with one read of O and one read/write of W of any float dtype, computed in float32 and
  rounded once (``reference.weight_update_pass_``). The row factor r is eta_hat*rowscale_i
  (TrasMuon, NorMuon) or one step size (Muon); the column gate c is optional.

Each launcher has a ``prepare_*`` twin returning its launch with every argument computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    FLOAT_DTYPES,
    BucketLike,
    PassConfig,
    TensorBucket,
    check_device,
    check_dtype,
    check_no_overlap,
    check_same_device,
    check_shape,
    check_stack,
    default_config,
    f32,
    interpreting,
    matrix_base,
    out_or_new,
    props_for,
    round_to,
    saturate,
    scalar_or_tensor,
    vector_block_config,
)
from ._launch import DeviceProps, Launch, Prepared, public_op


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _row_sumsq_kernel(
    o_ptr, out_ptr, d_out, d_in, n_rb, sob, sor, soc, sout_b,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # A program owns BLOCK_R whole rows: the sum over columns needs no second stage.
    pid = tl.program_id(0)
    rb = pid % n_rb
    b = pid // n_rb
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < d_out
    rows64 = rows.to(tl.int64)
    o_mat = o_ptr + b.to(tl.int64) * sob
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, d_in, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < d_in)[None, :]
        o = tl.load(o_mat + rows64[:, None] * sor + cols.to(tl.int64)[None, :] * soc, mask=mask, other=0.0)
        o = o.to(tl.float32)
        acc += o * o
    tl.store(out_ptr + b.to(tl.int64) * sout_b + rows64, tl.sum(acc, axis=1), mask=row_mask)


@triton.jit
def _row_stats_kernel(
    rss_ptr, v_ptr, rs_ptr, eta_ptr, lr_ptr, sumsq_ptr,
    d_out, d_in_f, beta2, one_minus_beta2, eps, eta_eps, eta_num, s_sb,
    LR_PTR: tl.constexpr, WRITE_SUMSQ: tl.constexpr, WRITE_ETA: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per matrix; the Frobenius sum runs over row blocks in a fixed order.
    b = tl.program_id(0)
    row0 = b.to(tl.int64) * d_out
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, d_out, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        mask = rows < d_out
        rss = tl.load(rss_ptr + row0 + rows, mask=mask, other=0.0)
        v = tl.load(v_ptr + row0 + rows, mask=mask, other=0.0)
        # row_v.mul_(beta2).add_(rowsumsq / d_in, alpha=1-beta2): ATen fuses the add (fma)
        v = saturate(tl.fma(tl.div_rn(rss, d_in_f), one_minus_beta2, v * beta2))
        tl.store(v_ptr + row0 + rows, v, mask=mask)
        # row_scale: 1 / (sqrt(v) + eps), IEEE sqrt and division as torch
        rs = tl.div_rn(1.0, tl.sqrt_rn(v) + eps)
        tl.store(rs_ptr + row0 + rows, rs, mask=mask)
        acc += tl.where(mask, (rss * rs) * rs, 0.0)
    base_sumsq = tl.sum(acc, axis=0)
    if WRITE_SUMSQ:
        # ||O_base||_F^2, for callers that complete it across shards of the rows
        tl.store(sumsq_ptr + b.to(tl.int64) * s_sb, base_sumsq)
    if WRITE_ETA:  # (the step forms eta_hat in the update pass, from the completed sum)
        fro = tl.sqrt_rn(base_sumsq)
        if LR_PTR:
            # float(scale*sqrt(d_out*d_in)) * lr_tensor, then a tensor division
            eta = tl.div_rn(eta_num * tl.load(lr_ptr).to(tl.float32), fro + eta_eps)
        else:
            # Python float / tensor is reciprocal(tensor) * float in torch
            eta = tl.div_rn(1.0, fro + eta_eps) * eta_num
        tl.store(eta_ptr + b, eta)


@triton.jit
def _update_kernel(
    w_base, w_table, o_ptr, rs_ptr, eta_ptr, gate_ptr, step_ptr, lr_ptr, decay_ptr,
    d_out, d_in, n_rb, n_cb,
    swb, swr, swc, sob, sor, soc, srb, srr, sgb, sgc, seb, ssb, sdb, sdj,
    step_value, step_scale, decay_value, weight_decay, eta_num, eta_eps,
    W_TABLE: tl.constexpr, W_ALIGNED: tl.constexpr,
    ROW_MODE: tl.constexpr, HAS_GATE: tl.constexpr, STEP_PTR: tl.constexpr, LR_PTR: tl.constexpr,
    DECAY_MODE: tl.constexpr,
    EMULATE_BF16_RNE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One tile per program: read O and W once, write W once. All math in float32 with the
    # reference's rounding order: r = eta*rs; U = (O*r)*c; W = W*decay - U, rounded once.
    # ROW_MODE (the launcher's row factor types): 0 EtaRows, eta_hat given (eta_ptr);
    # 2 EtaFromSumsq, eta_hat formed here from ||O_base||_F^2 at eta_ptr, as
    # _row_stats_kernel forms it; 1 StepSize, one step size per matrix (Muon: lr times a
    # factor, stride 0; NAMO: its step_up); 3 StepRows, that step times rowscale_i.
    # DECAY_MODE 0: 1 - lr*wd; 1 DecayPerMatrix; 2 DecayPerColumn (NAMO-D), at decay_ptr.
    pid = tl.program_id(0)
    cb = pid % n_cb
    rest = pid // n_cb
    rb = rest % n_rb
    b = rest // n_rb
    b64 = b.to(tl.int64)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < d_out
    col_mask = cols < d_in
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    o = tl.load(o_ptr + b64 * sob + rows64[:, None] * sor + cols64[None, :] * soc, mask=mask, other=0.0)
    o = o.to(tl.float32)
    if ROW_MODE == 1 or ROW_MODE == 3:
        # One step size (a device step times a host factor, as lr_tensor * float in torch)
        if STEP_PTR:
            step = tl.load(step_ptr + b64 * ssb).to(tl.float32) * step_scale
        else:
            step = step_value
        if ROW_MODE == 1:  # Muon, NAMO: the same for every row
            u = o * step
        else:  # times a per-row factor: r_i = step * rowscale_i
            rs = tl.load(rs_ptr + b64 * srb + rows64 * srr, mask=row_mask, other=0.0)
            u = o * (step * rs)[:, None]
    else:
        # TrasMuon / NorMuon: r_i = eta_hat * rowscale_i
        if ROW_MODE == 0:
            eta = tl.load(eta_ptr + b64 * seb)
        else:
            fro = tl.sqrt_rn(tl.load(eta_ptr + b64 * seb))
            if LR_PTR:
                eta = tl.div_rn(eta_num * tl.load(lr_ptr).to(tl.float32), fro + eta_eps)
            else:
                eta = tl.div_rn(1.0, fro + eta_eps) * eta_num
        rs = tl.load(rs_ptr + b64 * srb + rows64 * srr, mask=row_mask, other=0.0)
        r = eta * rs
        u = o * r[:, None]
    if HAS_GATE:
        c = tl.load(gate_ptr + b64 * sgb + cols64 * sgc, mask=col_mask, other=0.0)
        u = u * c[None, :]
    if DECAY_MODE == 1:
        decay = tl.load(decay_ptr + b64 * sdb)
    elif DECAY_MODE == 2:
        decay = tl.load(decay_ptr + b64 * sdb + cols64 * sdj, mask=col_mask, other=1.0)[None, :]
    elif LR_PTR:
        decay = 1.0 - tl.load(lr_ptr).to(tl.float32) * weight_decay  # float32, as lr_tensor*wd
    else:
        decay = decay_value  # 1 - lr*wd in double on the host, rounded once

    w_mat = matrix_base(w_base, w_table, b, swb, W_TABLE, W_ALIGNED)
    w_off = rows64[:, None] * swr + cols64[None, :] * swc
    w = tl.load(w_mat + w_off, mask=mask, other=0.0).to(tl.float32)
    w = w * decay - u
    tl.store(w_mat + w_off, round_to(w, w_base.dtype.element_ty, EMULATE_BF16_RNE), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
def prepare_row_sumsq(
    ortho: Tensor,
    *,
    out: Tensor | None = None,
    config: PassConfig | None = None,
    props: DeviceProps | None = None,
) -> Prepared:
    """sum_j O_ij^2 accumulated in float32: ``result`` is the (B, d_out) float32 sums (written
    into ``out`` when given). ``ortho``: (B, d_out, d_in) stack, fp32/bf16/fp16, any strides (a
    ``.mT`` view of a pre-transposed Newton-Schulz output works). Eager twin:
    ``reference.row_sumsq``."""
    check_stack("ortho", ortho, props)
    count, d_out, d_in = ortho.shape
    result = out_or_new("out", out, (count, d_out), torch.float32, ortho.device)
    if result.stride(1) != 1:
        raise ValueError("out must have unit stride along rows")
    config = config or default_config(d_out, d_in, props=props_for(ortho, props))
    config.check()
    if count == 0 or d_out == 0:
        return Prepared([], result)
    n_rb = triton.cdiv(d_out, config.block_r)
    so = ortho.stride()
    launch = Launch(
        _row_sumsq_kernel,
        (count * n_rb,),
        (ortho, result, d_out, d_in, n_rb, so[0], so[1], so[2], result.stride(0)),
        dict(BLOCK_R=config.block_r, BLOCK_C=config.block_c,
             num_warps=config.num_warps, enable_fp_fusion=False),
    )
    return Prepared([launch], result)


row_sumsq = public_op(prepare_row_sumsq, "row_sumsq")


def prepare_row_stats(
    row_v: Tensor,
    rowsumsq: Tensor,
    *,
    d_in: int,
    beta2: float,
    eps: float,
    scale: float,
    lr: float | Tensor,
    eta_eps: float,
    rowscale_out: Tensor | None = None,
    eta_hat_out: Tensor | None = None,
    sumsq_out: Tensor | None = None,
    with_eta_hat: bool = True,
    block: int | None = None,
    props: DeviceProps | None = None,
) -> Prepared:
    """docs/rule.md, steps 4-6 for B matrices in one launch: updates ``row_v`` (B, d_out)
    float32 in place; ``result`` is ``(rowscale (B, d_out), eta_hat (B,))``, float32,
    allocated here when ``rowscale_out``/``eta_hat_out`` are not given.
    ``rowsumsq``: (B, d_out) float32 row sums of squares of O. ``d_in``: columns of O. ``lr``:
    float or one-element float tensor (read on device). ``eta_eps``: added to ||O_base||_F
    before dividing (the rule's 1e-12, ``reference.ETA_HAT_EPS``). ``sumsq_out``: optional
    (B,) float32 (any stride) receiving ||O_base||_F^2 = sum_i rowsumsq_i rowscale_i^2
    (``reference.o_base_sumsq``), for a caller that completes it over shards of the rows and
    forms eta_hat in the update pass (``update_pass_`` with ``EtaFromSumsq``).
    ``with_eta_hat=False`` (with ``sumsq_out``): eta_hat is neither formed nor written
    (``result`` holds None for it), for a step whose update pass forms it from ``sumsq_out``.
    Eager twin: ``reference.row_stats_``."""
    for name, t in (("row_v", row_v), ("rowsumsq", rowsumsq)):
        if not isinstance(t, Tensor) or t.ndim != 2:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2D tensor (B, d_out), got {shape}")
        check_device(name, t, props)
        check_dtype(name, t, (torch.float32,))
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    count, d_out = row_v.shape
    check_shape("rowsumsq", rowsumsq, (count, d_out))
    device = row_v.device
    check_same_device("rowsumsq", rowsumsq, device)
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
        raise ValueError(f"d_in must be an int >= 1, got {d_in!r}")
    rowscale = out_or_new("rowscale_out", rowscale_out, (count, d_out), torch.float32, device)
    if not rowscale.is_contiguous():
        raise ValueError("rowscale_out must be contiguous")
    if not isinstance(with_eta_hat, bool):
        raise TypeError(f"with_eta_hat must be a bool, got {type(with_eta_hat).__name__}")
    if not with_eta_hat and eta_hat_out is not None:
        raise ValueError("with_eta_hat=False takes no eta_hat_out")
    eta = out_or_new("eta_hat_out", eta_hat_out, (count,), torch.float32, device) if with_eta_hat else None
    sumsq = None
    if sumsq_out is not None:
        sumsq = out_or_new("sumsq_out", sumsq_out, (count,), torch.float32, device)
    lr_t, _ = scalar_or_tensor("lr", lr, device)
    numerator = scale * math.sqrt(d_out * d_in)  # the reference's float factor, in double
    if lr_t is None:
        numerator = numerator * float(lr)  # (scale*sqrt(d_out*d_in)) * lr, in double
    blk, num_warps = vector_block_config(d_out, props_for(row_v, props), block)
    launch = Launch(
        _row_stats_kernel,
        (count,),
        (
            rowsumsq, row_v, rowscale, eta if eta is not None else rowscale,
            lr_t if lr_t is not None else row_v, sumsq if sumsq is not None else rowscale,
            d_out, f32(d_in), f32(beta2), f32(1.0 - beta2), f32(eps), f32(eta_eps), f32(numerator),
            sumsq.stride(0) if sumsq is not None else 0,
        ),
        dict(LR_PTR=lr_t is not None, WRITE_SUMSQ=sumsq is not None, WRITE_ETA=with_eta_hat, BLOCK=blk,
             num_warps=num_warps, enable_fp_fusion=False),
    )
    return Prepared([launch], (rowscale, eta))


row_stats_ = public_op(prepare_row_stats, "row_stats_")


def decay_factor(lr: float, weight_decay: float) -> float:
    """The decoupled weight decay factor 1 - lr*wd (docs/rule.md, step 1), computed in double
    on the host as the eager reference computes it for a float lr, then rounded to float32."""
    return f32(1.0 - float(lr) * float(weight_decay))


# --------------------------------------------------------------------------------------
# The update pass's modes: one row factor r_i (ROW_MODE) and one decay (DECAY_MODE)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EtaRows:
    """r_i = eta_hat * rowscale_i (TrasMuon, NorMuon): ``eta_hat`` (B,) and ``rowscale``
    (B, d_out), float32."""

    eta_hat: Tensor
    rowscale: Tensor
    mode: ClassVar[int] = 0


@dataclass(frozen=True)
class EtaFromSumsq:
    """r_i = eta_hat * rowscale_i with eta_hat formed here from ``o_base_sumsq`` (B,) =
    ||O_base||_F^2 (any stride) exactly as ``row_stats_`` forms it: eta_scale * lr /
    (sqrt(o_base_sumsq) + eta_eps), ``eta_scale`` = scale*sqrt(d_out*d_in) (docs/rule.md,
    step 6; for matrices whose rows are sharded, with the sum completed over the shards)."""

    o_base_sumsq: Tensor
    rowscale: Tensor
    eta_scale: float
    eta_eps: float
    mode: ClassVar[int] = 2


@dataclass(frozen=True)
class StepSize:
    """r_i = step for every row (Muon: lr times its shape factor; NAMO: its step_up):
    ``step`` a float, a one-element device tensor, or (B,) float32, one per matrix, times
    ``scale`` (a host float: for a tensor step, multiplied on the device in float32, as
    ``lr_tensor * float`` in torch; for a float step, in double on the host)."""

    step: float | Tensor
    scale: float = 1.0
    mode: ClassVar[int] = 1


@dataclass(frozen=True)
class StepRows:
    """r_i = step * scale * rowscale_i: one step size (as ``StepSize``) times a per-row
    factor ``rowscale`` (B, d_out) float32 (a Muon with per-row RMS normalization)."""

    step: float | Tensor
    rowscale: Tensor
    scale: float = 1.0
    mode: ClassVar[int] = 3


RowFactor = EtaRows | EtaFromSumsq | StepSize | StepRows


@dataclass(frozen=True)
class DecayPerMatrix:
    """W's decay factor read per matrix: ``decay`` (B,) float32 (NAMO)."""

    decay: Tensor
    mode: ClassVar[int] = 1


@dataclass(frozen=True)
class DecayPerColumn:
    """W's decay factor read per column: ``decay`` (B, d_in) float32 (NAMO-D)."""

    decay: Tensor
    mode: ClassVar[int] = 2


Decay = DecayPerMatrix | DecayPerColumn


def prepare_update_pass(
    param: BucketLike,
    ortho: Tensor,
    *,
    lr: float | Tensor,
    row: RowFactor,
    weight_decay: float = 0.0,
    decay: Decay | None = None,
    col_gate: Tensor | None = None,
    config: PassConfig | None = None,
    props: DeviceProps | None = None,
) -> Prepared:
    """Memory pass 2 (docs/backends.md, stage 5): W <- decay*W - r_i * c_j * O_ij in place, in
    float32, rounded once to W's dtype (eager twin: ``reference.weight_update_pass_``).

    ``param``: B matrices (3D stack of any strides, list of 2D tensors, or ``TensorBucket``),
    fp32/bf16/fp16. ``ortho``: (B, d_out, d_in) fp32/bf16/fp16 stack, any strides. ``row``:
    the row factor r (``EtaRows``, ``EtaFromSumsq``, ``StepSize``, ``StepRows``).
    ``col_gate``: (B, d_in) float32 or None (no gate). ``decay``: None for decoupled weight
    decay 1 - lr*wd (docs/rule.md, step 1: for a float lr computed in double on the host and
    rounded once, ``decay_factor``; for a one-element tensor lr in float32 on the device), or
    a decay read per matrix or per column. ``result`` is None."""
    w = TensorBucket.of(param, "param", props)
    check_dtype("param", w.base, FLOAT_DTYPES)
    if not w.uses_table:
        check_no_overlap("param", w.base)
    check_stack("ortho", ortho, props)
    count, (d_out, d_in) = w.count, w.shape
    device = w.device
    check_shape("ortho", ortho, (count, d_out, d_in))
    check_same_device("ortho", ortho, device)

    def vector(name: str, t, shape: tuple[int, ...]) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        check_shape(name, t, shape)
        check_dtype(name, t, (torch.float32,))
        check_same_device(name, t, device)

    lr_t, _ = scalar_or_tensor("lr", lr, device)
    if not isinstance(row, (EtaRows, EtaFromSumsq, StepSize, StepRows)):
        raise TypeError("row must be EtaRows, EtaFromSumsq, StepSize or StepRows, got "
                        f"{type(row).__name__}")
    rowscale = None if isinstance(row, StepSize) else row.rowscale
    if not isinstance(row, StepSize):
        vector("rowscale", rowscale, (count, d_out))
    eta_arg, eta_num, eta_eps = None, 0.0, 0.0
    step_t, step_v, step_scale = None, 0.0, 1.0
    if isinstance(row, EtaRows):
        vector("eta_hat", row.eta_hat, (count,))
        eta_arg = row.eta_hat
    elif isinstance(row, EtaFromSumsq):
        vector("o_base_sumsq", row.o_base_sumsq, (count,))
        eta_arg, eta_eps = row.o_base_sumsq, float(row.eta_eps)
        # As row_stats_: (scale*sqrt(d_out*d_in)) * lr in double for a float lr.
        eta_num = float(row.eta_scale) * (float(lr) if lr_t is None else 1.0)
    else:  # StepSize, StepRows
        step, step_scale = row.step, float(row.scale)
        if isinstance(step, Tensor) and step.ndim == 1 and step.numel() > 1:
            vector("step", step, (count,))  # one step per matrix
            step_t = step
        else:
            step_t, step_v = scalar_or_tensor("step", step, device)
        if step_t is None:
            step_v = f32(float(step) * step_scale)  # one product in double
    eta_stride = eta_arg.stride(0) if eta_arg is not None else 0
    step_stride = step_t.stride(0) if step_t is not None and step_t.ndim == 1 else 0
    if decay is not None:
        if not isinstance(decay, (DecayPerMatrix, DecayPerColumn)):
            raise TypeError(f"decay must be None, DecayPerMatrix or DecayPerColumn, got {type(decay).__name__}")
        vector("decay", decay.decay, (count,) if isinstance(decay, DecayPerMatrix) else (count, d_in))
    decay_t = decay.decay if decay is not None else None
    if col_gate is not None:
        vector("col_gate", col_gate, (count, d_in))
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise TypeError(f"weight_decay must be a float, got {type(weight_decay).__name__}")
    # A tensor lr: the kernel computes 1 - lr*wd in float32 on device, as torch would.
    decay_v = decay_factor(float(lr), weight_decay) if lr_t is None else 0.0

    config = config or default_config(d_out, d_in, props=props_for(w.base, props))
    config.check()
    if count == 0 or d_out == 0 or d_in == 0:  # an empty row shard: nothing to update
        return Prepared([], None)
    n_rb = triton.cdiv(d_out, config.block_r)
    n_cb = triton.cdiv(d_in, config.block_c)
    sw, so = w.strides, ortho.stride()
    any_t = ortho  # stands in for pointer arguments a constexpr flag leaves unused
    launch = Launch(
        _update_kernel,
        (count * n_rb * n_cb,),
        (
            w.base, w.table if w.uses_table else w.base, ortho,
            rowscale if rowscale is not None else any_t,
            eta_arg if eta_arg is not None else any_t,
            col_gate if col_gate is not None else any_t,
            step_t if step_t is not None else any_t,
            lr_t if lr_t is not None else any_t,
            decay_t if decay_t is not None else any_t,
            d_out, d_in, n_rb, n_cb,
            sw[0], sw[1], sw[2], so[0], so[1], so[2],
            rowscale.stride(0) if rowscale is not None else 0,
            rowscale.stride(1) if rowscale is not None else 0,
            col_gate.stride(0) if col_gate is not None else 0,
            col_gate.stride(1) if col_gate is not None else 0,
            eta_stride, step_stride,
            decay_t.stride(0) if decay_t is not None else 0,
            decay_t.stride(1) if decay_t is not None and decay_t.ndim == 2 else 0,
            step_v, f32(step_scale), decay_v, f32(weight_decay), f32(eta_num), f32(eta_eps),
        ),
        dict(
            W_TABLE=w.uses_table, W_ALIGNED=w.aligned,
            ROW_MODE=row.mode, HAS_GATE=col_gate is not None,
            STEP_PTR=step_t is not None, LR_PTR=lr_t is not None,
            DECAY_MODE=decay.mode if decay is not None else 0,
            EMULATE_BF16_RNE=interpreting(), BLOCK_R=config.block_r, BLOCK_C=config.block_c,
            num_warps=config.num_warps, enable_fp_fusion=False,
        ),
        keepalive=(w,),
    )
    return Prepared([launch], None)


update_pass_ = public_op(prepare_update_pass, "update_pass_")


__all__ = [
    "Decay",
    "DecayPerColumn",
    "DecayPerMatrix",
    "EtaFromSumsq",
    "EtaRows",
    "RowFactor",
    "StepRows",
    "StepSize",
    "decay_factor",
    "prepare_row_stats",
    "prepare_row_sumsq",
    "prepare_update_pass",
    "row_stats_",
    "row_sumsq",
    "update_pass_",
]
