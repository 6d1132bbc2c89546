"""NAMO's and NAMO-D's step factors (docs/rule.md, "NAMO and NAMO-D", steps 1 and 4-6): one
program per matrix.

From the column sums of squares of the raw gradient G and of the Newton-Schulz input N (summed
over all rows: the momentum pass reduces them, an all-reduce completes them for row-sharded
matrices), the program

* updates the second moment: NAMO's v (one per matrix) from ||G||_F^2 = sum_j, or NAMO-D's
  V_j (one per column);
* forms base = lr sqrt(1 - b2^t) / (1 - b1^t + bias_eps) from the matrix's step t and lr, both
  read from device memory (the bias corrections in float32, ``one_minus_pow``; ``bias_eps``
  from the caller: ``reference.NAMO_BIAS_EPS``);
* NAMO: alpha = base ||N||_F / (sqrt(v) + eps); NAMO-D: d_j = ||N_:,j|| / (sqrt(V_j) + eps),
  clamped to [clamp mean(d), mean(d) / clamp] when 0 < clamp <= 1 and the mean is finite and
  > 0 (the mean of the unclamped d: a first pass over the columns), then base * d_j;
* writes the update step min(s * shape, 1) and the decay factor: max(1 - wd min(s, 1), 0)
  ("adaptive") or 1 - lr wd ("lr"), per matrix or per column, for the update pass
  (``update.update_pass_(row=StepSize(step_up), decay=DecayPerMatrix(...))``, or
  ``row=StepSize(1.0), col_gate=step_up, decay=DecayPerColumn(...)``).

Eager twin: ``trasmuon.reference.namo_factors_``. It computes the bias corrections in double
on the host, so the two agree to float32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    check_device,
    check_dtype,
    check_same_device,
    check_shape,
    f32,
    log_beta,
    one_minus_pow,
    out_or_new,
    props_for,
    saturate,
    scalar_or_tensor,
    vector_block_config,
)
from ._launch import DeviceProps, Launch, Prepared, public_op

WEIGHT_DECAY_MODES = ("adaptive", "lr")
# Columns per block: NAMO-D loops over the columns twice (mean, then clamp); at 2048 values
# per block with 8 warps sm_90 spilled (the compile report), 1024 keeps 4 values per thread.
MAX_BLOCK = 1024


@triton.jit
def _namo_factors_kernel(
    gsum_ptr, nsum_ptr, v_ptr, steps_ptr, lr_ptr, decay_ptr, up_ptr,
    n, ssb, s_sum_b, s_v_b, s_out_b,
    beta2, one_minus_beta2, eps, weight_decay, shape, clamp, log_beta1, log_beta2, bias_eps,
    COLUMNS: tl.constexpr, ADAPTIVE: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    g_row = gsum_ptr + b * s_sum_b
    n_row = nsum_ptr + b * s_sum_b
    t = tl.load(steps_ptr + b * ssb).to(tl.float32)
    lr = tl.load(lr_ptr).to(tl.float32)
    base = lr * tl.div_rn(tl.sqrt_rn(one_minus_pow(log_beta2, t)),
                          one_minus_pow(log_beta1, t) + bias_eps)
    if ADAPTIVE:
        lr_decay = 1.0
    else:
        lr_decay = 1.0 - lr * weight_decay
    if COLUMNS:
        # Pass 1: V_j and the unclamped d_j (kept in the step output), and their mean.
        d_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n
            # Saturated already by the pass's finalize; again after a caller's all-reduce.
            gs = saturate(tl.load(g_row + cols, mask=mask, other=0.0))
            ns = saturate(tl.load(n_row + cols, mask=mask, other=0.0))
            v = tl.load(v_ptr + b * s_v_b + cols, mask=mask, other=0.0)
            v = saturate(tl.fma(gs, one_minus_beta2, v * beta2))  # v.mul_(b2).add_(gs, alpha=1-b2)
            tl.store(v_ptr + b * s_v_b + cols, v, mask=mask)
            d = tl.div_rn(tl.sqrt_rn(ns), tl.sqrt_rn(v) + eps)
            tl.store(up_ptr + b * s_out_b + cols, d, mask=mask)
            d_sum += tl.where(mask, d, 0.0)
        mean = tl.sum(d_sum, axis=0) / n
        usable = (mean - mean == 0.0) & (mean > 0)  # finite (inf - inf and NaN are NaN) and > 0
        lo = clamp * mean
        hi = tl.div_rn(mean, clamp)
        # Pass 2: clamp, then the step sizes and the decay, column by column.
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n
            d = tl.load(up_ptr + b * s_out_b + cols, mask=mask, other=0.0)
            if CLAMP:
                d = tl.where(usable, tl.minimum(tl.maximum(d, lo), hi), d)
            s = base * d
            up = tl.minimum(s * shape, 1.0)
            if ADAPTIVE:
                decay = tl.maximum(1.0 - weight_decay * tl.minimum(s, 1.0), 0.0)
            else:
                decay = tl.zeros_like(s) + lr_decay
            tl.store(up_ptr + b * s_out_b + cols, up, mask=mask)
            tl.store(decay_ptr + b * s_out_b + cols, decay, mask=mask)
    else:
        g_acc = tl.zeros((BLOCK,), dtype=tl.float32)
        n_acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n
            g_acc += tl.load(g_row + cols, mask=mask, other=0.0)
            n_acc += tl.load(n_row + cols, mask=mask, other=0.0)
        gs = saturate(tl.sum(g_acc, axis=0))
        ns = saturate(tl.sum(n_acc, axis=0))
        v = tl.load(v_ptr + b * s_v_b)
        v = saturate(tl.fma(gs, one_minus_beta2, v * beta2))
        tl.store(v_ptr + b * s_v_b, v)
        alpha = tl.div_rn(base * tl.sqrt_rn(ns), tl.sqrt_rn(v) + eps)
        up = tl.minimum(alpha * shape, 1.0)
        if ADAPTIVE:
            decay = tl.maximum(1.0 - weight_decay * tl.minimum(alpha, 1.0), 0.0)
        else:
            decay = lr_decay
        tl.store(up_ptr + b * s_out_b, up)
        tl.store(decay_ptr + b * s_out_b, decay)


def _vector(name: str, t: Tensor, shape: tuple[int, ...], device: torch.device,
            props: DeviceProps | None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    check_device(name, t, props)
    check_shape(name, t, shape)
    check_dtype(name, t, (torch.float32,))
    check_same_device(name, t, device)
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along its last dimension")


def prepare_namo_factors(
    v: Tensor,
    grad_col_sumsq: Tensor,
    n_col_sumsq: Tensor,
    steps: Tensor,
    lr: Tensor,
    *,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale_shape: float,
    weight_decay_mode: str,
    clamp: float | None,
    bias_eps: float,
    decay_out: Tensor | None = None,
    step_out: Tensor | None = None,
    block: int | None = None,
    props: DeviceProps | None = None,
) -> Prepared:
    """NAMO's (``clamp=None``) or NAMO-D's factors for B matrices in one launch; ``result`` is
    (decay, step_up), (B,) for NAMO and (B, d_in) for NAMO-D, float32 (written into
    ``decay_out`` and ``step_out``, allocated here when not given).

    ``grad_col_sumsq``, ``n_col_sumsq``: (B, d_in) float32 column sums of squares of G and of N
    over all rows. ``v``: the second moment, updated in place: (B,) for NAMO, (B, d_in) for
    NAMO-D. ``steps``: (B,) device tensor of each matrix's t (>= 1). ``lr``: a one-element
    device tensor. ``scale_shape``: scale * sqrt(max(d_out, d_in)). ``bias_eps``: added to the
    first-moment bias correction before dividing (``reference.NAMO_BIAS_EPS``). Eager twin:
    ``reference.namo_factors_``.
    """
    if not isinstance(grad_col_sumsq, Tensor) or grad_col_sumsq.ndim != 2:
        raise ValueError("grad_col_sumsq must be a (B, d_in) tensor")
    count, n = grad_col_sumsq.shape
    device = grad_col_sumsq.device
    columns = clamp is not None
    _vector("grad_col_sumsq", grad_col_sumsq, (count, n), device, props)
    _vector("n_col_sumsq", n_col_sumsq, (count, n), device, props)
    if n_col_sumsq.stride(0) != grad_col_sumsq.stride(0):
        raise ValueError("grad_col_sumsq and n_col_sumsq must share their row stride")
    if columns:
        _vector("v", v, (count, n), device, props)
    else:
        check_shape("v", v, (count,))
        check_dtype("v", v, (torch.float32,))
        check_same_device("v", v, device)
    if not isinstance(steps, Tensor) or steps.shape != (count,):
        raise ValueError(f"steps must be a ({count},) device tensor of each matrix's step t")
    check_same_device("steps", steps, device)
    lr_t, _ = scalar_or_tensor("lr", lr, device)
    if lr_t is None:
        raise TypeError("lr must be a one-element device tensor (read by the kernel)")
    if weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
    if clamp is not None and not 0.0 <= clamp <= 1.0:
        raise ValueError(f"clamp must be None (NAMO) or in [0, 1] (NAMO-D), got {clamp!r}")
    b1, b2 = betas
    out_shape = (count, n) if columns else (count,)
    decay = out_or_new("decay_out", decay_out, out_shape, torch.float32, device)
    step = out_or_new("step_out", step_out, out_shape, torch.float32, device)
    if decay.stride() != step.stride():
        raise ValueError("decay_out and step_out must have the same strides")
    if count == 0:
        return Prepared([], (decay, step))
    blk, num_warps = vector_block_config(n, props_for(grad_col_sumsq, props), block)
    if block is None and blk > MAX_BLOCK:  # two passes over the columns: keep registers free
        blk, num_warps = MAX_BLOCK, 8
    launch = Launch(
        _namo_factors_kernel,
        (count,),
        (
            grad_col_sumsq, n_col_sumsq, v, steps, lr_t, decay, step,
            n, steps.stride(0), grad_col_sumsq.stride(0), v.stride(0), step.stride(0),
            f32(b2), f32(1.0 - b2), f32(eps), f32(weight_decay), f32(scale_shape),
            f32(clamp if clamp else 1.0), log_beta(b1), log_beta(b2), f32(bias_eps),
        ),
        dict(COLUMNS=columns, ADAPTIVE=weight_decay_mode == "adaptive",
             CLAMP=columns and 0.0 < clamp <= 1.0, BLOCK=blk, num_warps=num_warps,
             enable_fp_fusion=False),
    )
    return Prepared([launch], (decay, step))


namo_factors_ = public_op(prepare_namo_factors, "namo_factors_")


__all__ = ["WEIGHT_DECAY_MODES", "namo_factors_", "prepare_namo_factors"]
