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
from ._launch import DeviceProps, Launch, Prepared, run_all


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
    LR_PTR: tl.constexpr, WRITE_SUMSQ: tl.constexpr, BLOCK: tl.constexpr,
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
    # ROW_MODE 0: eta_hat given (eta_ptr); 2: eta_hat formed here from ||O_base||_F^2 at
    # eta_ptr, as _row_stats_kernel forms it; 1: one step size per matrix (Muon: lr times a
    # factor, stride 0; NAMO: its step_up). DECAY_MODE 0: 1 - lr*wd; 1: a decay per matrix;
    # 2: a decay per column (NAMO-D), both read at decay_ptr.
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
    if ROW_MODE == 1:
        # Muon: one step size for every row (a device step times a host factor, as
        # lr_tensor * float in torch)
        if STEP_PTR:
            step = tl.load(step_ptr + b64 * ssb).to(tl.float32) * step_scale
        else:
            step = step_value
        u = o * step
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
    """The launch of :func:`row_sumsq` (same arguments); ``result`` is the (B, d_out) sums."""
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


def row_sumsq(
    ortho: Tensor,
    *,
    out: Tensor | None = None,
    config: PassConfig | None = None,
    props: DeviceProps | None = None,
) -> Tensor:
    """sum_j O_ij^2 accumulated in float32: (B, d_out). ``ortho``: (B, d_out, d_in) stack,
    fp32/bf16/fp16, any strides (a ``.mT`` view of a pre-transposed Newton-Schulz output
    works). Eager twin: ``reference.row_sumsq``."""
    prepared = prepare_row_sumsq(ortho, out=out, config=config, props=props)
    run_all(prepared)
    return prepared.result


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
    block: int | None = None,
    props: DeviceProps | None = None,
) -> Prepared:
    """The launch of :func:`row_stats_` (same arguments); ``result`` is ``(rowscale, eta_hat)``,
    allocated here when not given."""
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
    eta = out_or_new("eta_hat_out", eta_hat_out, (count,), torch.float32, device)
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
            rowsumsq, row_v, rowscale, eta, lr_t if lr_t is not None else row_v,
            sumsq if sumsq is not None else eta,
            d_out, f32(d_in), f32(beta2), f32(1.0 - beta2), f32(eps), f32(eta_eps), f32(numerator),
            sumsq.stride(0) if sumsq is not None else 0,
        ),
        dict(LR_PTR=lr_t is not None, WRITE_SUMSQ=sumsq is not None, BLOCK=blk,
             num_warps=num_warps, enable_fp_fusion=False),
    )
    return Prepared([launch], (rowscale, eta))


def row_stats_(
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
    block: int | None = None,
    props: DeviceProps | None = None,
) -> tuple[Tensor, Tensor]:
    """docs/rule.md, steps 4-6 for B matrices in one launch: updates ``row_v`` (B, d_out)
    float32 in place and returns ``(rowscale (B, d_out), eta_hat (B,))``, float32.
    ``rowsumsq``: (B, d_out) float32 row sums of squares of O. ``d_in``: columns of O. ``lr``:
    float or one-element float tensor (read on device). ``eta_eps``: added to ||O_base||_F
    before dividing (the rule's 1e-12, ``reference.ETA_HAT_EPS``). ``sumsq_out``: optional
    (B,) float32 (any stride) receiving ||O_base||_F^2 = sum_i rowsumsq_i rowscale_i^2
    (``reference.o_base_sumsq``), for a caller that completes it over shards of the rows and
    forms eta_hat in the update pass (``update_pass_(o_base_sumsq=...)``). Eager twin:
    ``reference.row_stats_``."""
    prepared = prepare_row_stats(
        row_v, rowsumsq, d_in=d_in, beta2=beta2, eps=eps, scale=scale, lr=lr, eta_eps=eta_eps,
        rowscale_out=rowscale_out, eta_hat_out=eta_hat_out, sumsq_out=sumsq_out, block=block,
        props=props,
    )
    run_all(prepared)
    return prepared.result


def decay_factor(lr: float, weight_decay: float) -> float:
    """The decoupled weight decay factor 1 - lr*wd (docs/rule.md, step 1), computed in double
    on the host as the eager reference computes it for a float lr, then rounded to float32."""
    return f32(1.0 - float(lr) * float(weight_decay))


def prepare_update_pass(
    param: BucketLike,
    ortho: Tensor,
    *,
    lr: float | Tensor,
    weight_decay: float = 0.0,
    eta_hat: Tensor | None = None,
    rowscale: Tensor | None = None,
    o_base_sumsq: Tensor | None = None,
    eta_scale: float | None = None,
    eta_eps: float | None = None,
    step_size: float | Tensor | None = None,
    step_scale: float = 1.0,
    col_gate: Tensor | None = None,
    decay: Tensor | None = None,
    config: PassConfig | None = None,
    props: DeviceProps | None = None,
) -> Prepared:
    """The launch of :func:`update_pass_` (same arguments); ``result`` is None."""
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
    modes = [eta_hat is not None, o_base_sumsq is not None, step_size is not None]
    if sum(modes) != 1:
        raise ValueError(
            "give one row factor: eta_hat and rowscale (TrasMuon/NorMuon), o_base_sumsq, eta_scale, "
            "eta_eps and rowscale (eta_hat formed here), or step_size (Muon)"
        )
    eta_arg, eta_stride, eta_num = None, 0, 0.0
    step_t, step_v = None, 0.0
    if step_size is None:
        if rowscale is None:
            raise ValueError("the TrasMuon/NorMuon row factor needs rowscale")
        vector("rowscale", rowscale, (count, d_out))
        if eta_hat is not None:
            vector("eta_hat", eta_hat, (count,))
            eta_arg, row_mode = eta_hat, 0
        else:
            vector("o_base_sumsq", o_base_sumsq, (count,))
            if eta_scale is None or eta_eps is None:
                raise ValueError("o_base_sumsq needs eta_scale (scale*sqrt(d_out*d_in)) and eta_eps")
            eta_arg, row_mode = o_base_sumsq, 2
            # As row_stats_: (scale*sqrt(d_out*d_in)) * lr in double for a float lr.
            eta_num = float(eta_scale) * (float(lr) if lr_t is None else 1.0)
        eta_stride = eta_arg.stride(0)
    else:
        if rowscale is not None:
            raise ValueError("step_size (Muon) excludes rowscale; give one row factor")
        if isinstance(step_size, Tensor) and step_size.ndim == 1 and step_size.numel() > 1:
            vector("step_size", step_size, (count,))  # one step per matrix
            step_t, step_v = step_size, 0.0
        else:
            step_t, step_v = scalar_or_tensor("step_size", step_size, device)
        if step_t is None:
            step_v = f32(float(step_size) * float(step_scale))  # one product in double
        row_mode = 1
    step_stride = step_t.stride(0) if step_t is not None and step_t.ndim == 1 else 0
    decay_mode = 0
    if decay is not None:
        if isinstance(decay, Tensor) and decay.ndim == 2:
            vector("decay", decay, (count, d_in))
            decay_mode = 2
        else:
            vector("decay", decay, (count,))
            decay_mode = 1
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
            decay if decay is not None else any_t,
            d_out, d_in, n_rb, n_cb,
            sw[0], sw[1], sw[2], so[0], so[1], so[2],
            rowscale.stride(0) if rowscale is not None else 0,
            rowscale.stride(1) if rowscale is not None else 0,
            col_gate.stride(0) if col_gate is not None else 0,
            col_gate.stride(1) if col_gate is not None else 0,
            eta_stride, step_stride,
            decay.stride(0) if decay is not None else 0,
            decay.stride(1) if decay is not None and decay.ndim == 2 else 0,
            step_v, f32(step_scale), decay_v, f32(weight_decay),
            f32(eta_num), f32(eta_eps if eta_eps is not None else 0.0),
        ),
        dict(
            W_TABLE=w.uses_table, W_ALIGNED=w.aligned,
            ROW_MODE=row_mode, HAS_GATE=col_gate is not None,
            STEP_PTR=step_t is not None, LR_PTR=lr_t is not None, DECAY_MODE=decay_mode,
            EMULATE_BF16_RNE=interpreting(), BLOCK_R=config.block_r, BLOCK_C=config.block_c,
            num_warps=config.num_warps, enable_fp_fusion=False,
        ),
        keepalive=(w,),
    )
    return Prepared([launch], None)


def update_pass_(
    param: BucketLike,
    ortho: Tensor,
    *,
    lr: float | Tensor,
    weight_decay: float = 0.0,
    eta_hat: Tensor | None = None,
    rowscale: Tensor | None = None,
    o_base_sumsq: Tensor | None = None,
    eta_scale: float | None = None,
    eta_eps: float | None = None,
    step_size: float | Tensor | None = None,
    step_scale: float = 1.0,
    col_gate: Tensor | None = None,
    decay: Tensor | None = None,
    config: PassConfig | None = None,
    props: DeviceProps | None = None,
) -> None:
    """Memory pass 2 (docs/backends.md, stage 5): W <- (1 - lr*wd)*W - r_i * c_j * O_ij in place.

    ``param``: B matrices (3D stack of any strides, list of 2D tensors, or ``TensorBucket``),
    fp32/bf16/fp16. ``ortho``: (B, d_out, d_in) fp32/bf16/fp16 stack, any strides. Row factor,
    one of:

    * ``eta_hat`` (B,) and ``rowscale`` (B, d_out) float32: r_i = eta_hat*rowscale_i;
    * ``o_base_sumsq`` (B,) float32 ||O_base||_F^2 (any stride), ``eta_scale`` =
      scale*sqrt(d_out*d_in), ``eta_eps`` and ``rowscale``: eta_hat = eta_scale*lr /
      (sqrt(o_base_sumsq) + eta_eps) formed here exactly as ``row_stats_`` forms it (docs/rule.md,
      step 6; for matrices whose rows are sharded, with the sum completed over the shards);
    * ``step_size`` (Muon: a float or a one-element device tensor) times ``step_scale`` (a
      host float: lr * scale for a tensor lr, computed in float32 as torch does).

    ``col_gate``: (B, d_in) float32 or None (no gate). ``lr`` (float or one-element tensor)
    and ``weight_decay`` give the decoupled decay factor 1 - lr*wd (docs/rule.md, step 1): for
    a float lr computed in double on the host and rounded once (``decay_factor``), for a
    tensor lr in float32 on the device. Eager twin: ``reference.weight_update_pass_``.
    """
    run_all(prepare_update_pass(
        param, ortho, lr=lr, weight_decay=weight_decay, eta_hat=eta_hat, rowscale=rowscale,
        o_base_sumsq=o_base_sumsq, eta_scale=eta_scale, eta_eps=eta_eps, step_size=step_size,
        step_scale=step_scale, col_gate=col_gate, decay=decay, config=config, props=props,
    ))


__all__ = [
    "decay_factor",
    "prepare_row_stats",
    "prepare_row_sumsq",
    "prepare_update_pass",
    "row_stats_",
    "row_sumsq",
    "update_pass_",
]
