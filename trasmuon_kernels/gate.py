"""The per-matrix gate kernel (docs/backends.md, stage 4; docs/rule.md, steps 8-11).

One program per matrix: the exact k-th smallest column energy E_cur (a bisection on the float
bits, bit-identical to ``torch.kthvalue``'s value; the 1-based rank k is the caller's, from the
rule's quantile: ``reference.quantile_rank``), the E_ref init/EMA, the schedule-free
accumulators S, C and c_avg, the ratio r, the clipped gate with its trigger, c_ema, the applied
gate c and c_last, with exactly ``reference.gate_stage_``'s semantics and rounding. The step t,
lr and the "first gated step" flag may live in device tensors, so no step needs a host sync.

``kth_smallest`` exposes the selection alone (eager twin: ``reference.kth_smallest``).

Exactness. Every float32 operation is the one torch performs, in the same order and with the
same rounding (IEEE division and square root via ``div_rn``, ``fma`` where ATen's vectorized
``add_(x, alpha=a)`` fuses, no mul+add contraction elsewhere: the kernels launch with
``enable_fp_fusion=False``). The one exception is ``log``: torch's CPU float32 log is Intel MKL
VML's ``vmsLn``, the interpreter's is numpy's float32 log and the GPU's is Triton's; these differ
by a few ulp on some inputs. The log only matters for ratios above the trigger whose gate is not
clamped to c_min, see docs/kernels-memory.md for the measured bound.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    check_device,
    check_dtype,
    check_same_device,
    check_shape,
    device_fn,
    f32,
    out_or_new,
    props_for,
    saturate,
    scalar_or_tensor,
    vector_block_config,
)
from ._launch import DeviceProps, Launch, Prepared, public_op


# --------------------------------------------------------------------------------------
# Exact k-th smallest: bisection on order-preserving integer keys
# --------------------------------------------------------------------------------------
@device_fn
def _order_key(x):
    """int64 key whose signed order is the float32 order of ``x``: the bits themselves for
    x >= +0 (so energies, which are >= 0, are their own keys), all but the sign bit flipped for
    negatives, and NaN (any sign) above +inf, where torch.kthvalue sorts it."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(x != x, 0x7FFFFFFF, key)
    return key.to(tl.int64)


@device_fn
def _key_to_float(key):
    bits = key.to(tl.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # the key map is its own inverse
    return bits.to(tl.float32, bitcast=True)


@device_fn
def _kth_smallest_row(row_ptr, stride, n, k, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """The k-th smallest (1-based) of the ``n`` float32 values at ``row_ptr + j*stride``.

    Finds the least key v with #{keys <= v} >= k by bisection on [min key, max key]: that v is
    always the key of an element (the count only steps up at element keys), so the result is
    one of the inputs, bit for bit. Ties need nothing special: the count includes every tied
    element. Integer counts: exact and order-independent. At most 32 halvings (32-bit keys),
    each one pass over the row (held in registers when n <= BLOCK).
    """
    offs = tl.arange(0, BLOCK)
    big = 0x7FFFFFFFFFFF  # outside the int32 key range
    if ONE_BLOCK:
        mask = offs < n
        keys = _order_key(tl.load(row_ptr + offs.to(tl.int64) * stride, mask=mask, other=0.0))
        lo = tl.min(tl.where(mask, keys, big), axis=0)
        hi = tl.max(tl.where(mask, keys, -big), axis=0)
        while lo < hi:
            mid = lo + ((hi - lo) >> 1)
            count = tl.sum(tl.where(mask & (keys <= mid), 1, 0), axis=0)
            below = count >= k
            hi = tl.where(below, mid, hi)
            lo = tl.where(below, lo, mid + 1)
    else:
        lo_v = tl.full((BLOCK,), big, tl.int64)
        hi_v = tl.full((BLOCK,), -big, tl.int64)
        for start in range(0, n, BLOCK):
            cols = start + offs
            mask = cols < n
            keys = _order_key(tl.load(row_ptr + cols.to(tl.int64) * stride, mask=mask, other=0.0))
            lo_v = tl.minimum(lo_v, tl.where(mask, keys, big))
            hi_v = tl.maximum(hi_v, tl.where(mask, keys, -big))
        lo = tl.min(lo_v, axis=0)
        hi = tl.max(hi_v, axis=0)
        while lo < hi:
            mid = lo + ((hi - lo) >> 1)
            count_v = tl.zeros((BLOCK,), tl.int32)
            for start in range(0, n, BLOCK):
                cols = start + offs
                mask = cols < n
                keys = _order_key(tl.load(row_ptr + cols.to(tl.int64) * stride, mask=mask, other=0.0))
                count_v += tl.where(mask & (keys <= mid), 1, 0)
            below = tl.sum(count_v, axis=0) >= k
            hi = tl.where(below, mid, hi)
            lo = tl.where(below, lo, mid + 1)
    return _key_to_float(lo)


@triton.jit
def _kth_kernel(v_ptr, out_ptr, n, k, svb, svj, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    b = tl.program_id(0)
    value = _kth_smallest_row(v_ptr + b.to(tl.int64) * svb, svj, n, k, BLOCK, ONE_BLOCK)
    tl.store(out_ptr + b, value)


# --------------------------------------------------------------------------------------
# The gate stage
# --------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["step_value", "first_value"])
def _gate_kernel(
    e_ptr, seb, sej,
    eref_ptr, cema_ptr, out_ptr, ecur_ptr,
    s_ptr, csum_ptr, clast_ptr,
    first_ptr, step_ptr, lr_ptr,
    first_value, step_value, lr2_value, step_stride,
    d_in, k, warmup_steps, clip_period,
    alpha, c_min, trigger, beta_c, one_minus_beta_c, beta_e, one_minus_beta_e,
    energy_eps, sf_mix, one_minus_sf_mix, sf_eps,
    FIRST_PTR: tl.constexpr, STEP_PTR: tl.constexpr, LR_PTR: tl.constexpr,
    SCHEDULE_FREE: tl.constexpr, HAS_TRIGGER: tl.constexpr, WRITE_ECUR: tl.constexpr,
    BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    # Program b owns matrix b's whole gate state, so no cross-program reduction exists. The
    # comments name the reference operation each line reproduces (same rounding).
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    e_row = e_ptr + b64 * seb
    row = b64 * d_in  # gate-state tensors are contiguous (B, d_in)

    # docs/rule.md, step 8: E_cur, then E_ref = E_cur on the first gated step, else the EMA
    # energy_ref.mul_(beta).add_(energy_cur, alpha=1-beta) (ATen fuses the add: one fma).
    e_cur = _kth_smallest_row(e_row, sej, d_in, k, BLOCK, ONE_BLOCK)
    if WRITE_ECUR:
        tl.store(ecur_ptr + b, e_cur)
    if FIRST_PTR:
        first = tl.load(first_ptr + b) != 0
    else:
        first = first_value != 0
    e_ref_old = tl.load(eref_ptr + b)
    e_ref = saturate(tl.where(first, e_cur, tl.fma(e_cur, one_minus_beta_e, e_ref_old * beta_e)))
    tl.store(eref_ptr + b, e_ref)
    if FIRST_PTR:
        tl.store(first_ptr + b, 0)  # the flag is consumed

    if STEP_PTR:
        t = tl.load(step_ptr + b64 * step_stride).to(tl.int64)  # stride 0: one t for all
    else:
        t = step_value.to(tl.int64)
    post_warmup = t > warmup_steps
    # reference.gate_updates_at: t > warmup and (t mod period == 0 or t == 1)
    gate_moves = post_warmup & (((t % clip_period) == 0) | (t == 1))

    if SCHEDULE_FREE:
        if LR_PTR:
            lr = tl.load(lr_ptr).to(tl.float32)
            lr2 = lr * lr
        else:
            lr2 = lr2_value  # lr*lr in double on the host, rounded once, as the reference
        s_old = tl.load(s_ptr + b)
        s_new = tl.where(post_warmup, s_old + lr2, s_old)
        tl.store(s_ptr + b, s_new)
        s_den = s_new + sf_eps

    denom = e_ref + energy_eps
    for start in range(0, d_in, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < d_in
        cols64 = cols.to(tl.int64)
        e = tl.load(e_row + cols64 * sej, mask=mask, other=0.0)
        # docs/rule.md, step 10: r = E / (E_ref + eps); c = clamp(1 / (1 + alpha ln(1 + r)), c_min, 1)
        ratio = tl.div_rn(e, denom)
        gate = tl.div_rn(1.0, 1.0 + alpha * tl.log(1.0 + ratio))
        gate = tl.minimum(tl.maximum(gate, c_min), 1.0)
        if HAS_TRIGGER:
            gate = tl.where(ratio <= trigger, 1.0, gate)
        c_ema = tl.load(cema_ptr + row + cols64, mask=mask, other=1.0)
        # c_ema.mul_(beta_c).add_(gate, alpha=1-beta_c): one fma, as ATen's vectorized add
        c_ema = tl.where(gate_moves, tl.fma(gate, one_minus_beta_c, c_ema * beta_c), c_ema)
        tl.store(cema_ptr + row + cols64, c_ema, mask=mask)
        if SCHEDULE_FREE:
            # docs/rule.md, step 9: C += lr^2 * c_last; c_avg = C / (S + eps) once S > 0, else 1
            c_last = tl.load(clast_ptr + row + cols64, mask=mask, other=1.0)
            c_sum = tl.load(csum_ptr + row + cols64, mask=mask, other=0.0)
            c_sum = tl.where(post_warmup, c_sum + c_last * lr2, c_sum)
            tl.store(csum_ptr + row + cols64, c_sum, mask=mask)
            c_avg = tl.where(s_new > 0, tl.div_rn(c_sum, s_den), 1.0)
            applied = one_minus_sf_mix * c_ema + sf_mix * c_avg
        else:
            applied = c_ema
        # docs/rule.md, step 11: c = 1 until warmup is over
        applied = tl.where(post_warmup, applied, 1.0)
        tl.store(out_ptr + row + cols64, applied, mask=mask)
        if SCHEDULE_FREE:
            tl.store(clast_ptr + row + cols64, applied, mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
def prepare_kth_smallest(
    values: Tensor,
    k: int,
    *,
    out: Tensor | None = None,
    block: int | None = None,
    props: DeviceProps | None = None,
) -> Prepared:
    """The k-th smallest (1-based) entry of each row of ``values`` ((B, n) float32, any
    strides): ``result`` is the (B,) float32 values (written into ``out`` when given),
    bit-identical to ``torch.kthvalue(values, k, dim=-1).values`` (NaN counts as the largest
    value). ``block``: columns per register block (power of two); default min(4096,
    next_pow2(n)). Eager twin: ``reference.kth_smallest``."""
    if not isinstance(values, Tensor) or values.ndim != 2:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"values must be a 2D tensor (B, n), got {shape}")
    check_device("values", values, props)
    check_dtype("values", values, (torch.float32,))
    count, n = values.shape
    if n == 0:
        raise ValueError("values has no columns; the k-th smallest of nothing is undefined")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}], got {k!r}")
    result = out_or_new("out", out, (count,), torch.float32, values.device)
    blk, num_warps = vector_block_config(n, props_for(values, props), block)
    launch = Launch(
        _kth_kernel,
        (count,),
        (values, result, n, k, values.stride(0), values.stride(1)),
        dict(BLOCK=blk, ONE_BLOCK=n <= blk, num_warps=num_warps),
    )
    return Prepared([launch], result)


kth_smallest = public_op(prepare_kth_smallest, "kth_smallest")


def _step_arg(value: int | Tensor, count: int, device: torch.device) -> tuple[Tensor | None, int, int]:
    """(tensor or None, host value, stride): the step as an int, a one-element tensor (one t
    for the bucket, stride 0) or a (B,) tensor of per-matrix steps."""
    if isinstance(value, Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"step tensor must be an integer or float tensor, got {value.dtype}")
        check_same_device("step", value, device)
        if value.numel() == 1:
            return value.reshape(()), 0, 0
        if value.ndim == 1 and value.shape[0] == count:
            return value, 0, value.stride(0)
        raise ValueError(
            f"step must be an int, a one-element tensor or a ({count},) tensor, got shape {tuple(value.shape)}"
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"step must be an int or a one-element tensor, got {type(value).__name__}")
    return None, value, 0


def prepare_gate_stage(
    state: MutableMapping[str, Tensor],
    energy: Tensor,
    step: int | Tensor,
    lr: float | Tensor,
    *,
    k: int,
    warmup_steps: int,
    clip_period: int,
    clip_alpha: float,
    clip_min: float,
    clip_trigger: float | None,
    clip_beta: float,
    energy_beta: float,
    energy_eps: float,
    schedule_free: bool,
    sf_mix: float,
    sf_eps: float,
    first: bool | Tensor | None = None,
    out: Tensor | None = None,
    energy_cur_out: Tensor | None = None,
    block: int | None = None,
    props: DeviceProps | None = None,
) -> Prepared:
    """docs/rule.md, steps 8-11 for a bucket of B gated matrices in one launch; ``result`` is
    the applied gate c, (B, d_in) float32 (written into ``out``, created here when not given).
    The arguments and state of ``reference.gate_stage_`` (its eager twin), except that the rank
    and the schedule-free eps are given, not derived:

    ``k``: the 1-based rank of E_cur among the d_in energies (``reference.quantile_rank(d_in,
    energy_quantile)``). ``sf_eps``: added to S before dividing C by it
    (``reference.SCHEDULE_FREE_EPS``).

    ``state`` holds float32 contiguous ``c_ema`` (B, d_in) and, with ``schedule_free``,
    ``sf_lr2_sum`` (B,), ``sf_c_lr2_sum`` and ``c_last`` (B, d_in) (``reference.init_gate_state``
    makes them), all updated in place, and ``energy_ref`` (B,), which is created here
    (uninitialized) when missing. ``energy``: (B, d_in) float32, any strides. ``step``: the
    1-based t, an int, a one-element integer/float device tensor, or a (B,) device tensor of
    per-matrix steps. ``lr``: a float or a one-element float tensor. Host scalars (``step``,
    ``lr``, a bool ``first``) are fixed in the launch: a list replayed every step takes them
    as device tensors.

    ``first``: whether this is the matrices' first gated step (E_ref := E_cur): a bool, or a
    (B,) bool/integer device tensor (nonzero = first), which the kernel then clears in place.
    None means "``energy_ref`` is not in ``state``", as the reference decides.
    ``energy_cur_out``: optional (B,) float32 tensor to receive E_cur. ``block``: columns per
    block (power of two); default min(4096, next_pow2(d_in)).
    """
    if not isinstance(energy, Tensor) or energy.ndim != 2:
        shape = tuple(energy.shape) if isinstance(energy, Tensor) else type(energy).__name__
        raise ValueError(f"energy must be a 2D tensor (B, d_in), got {shape}")
    check_device("energy", energy, props)
    check_dtype("energy", energy, (torch.float32,))
    count, d_in = energy.shape
    if d_in == 0:
        raise ValueError("energy has no columns")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_in:
        raise ValueError(f"k (the 1-based rank of E_cur) must be an int in [1, {d_in}], got {k!r}")
    device = energy.device

    def state_tensor(key: str, shape: tuple[int, ...]) -> Tensor:
        if key not in state:
            raise KeyError(f"state is missing {key!r}; create it with reference.init_gate_state")
        t = state[key]
        check_shape(f"state[{key!r}]", t, shape)
        check_dtype(f"state[{key!r}]", t, (torch.float32,))
        check_same_device(f"state[{key!r}]", t, device)
        if not t.is_contiguous():
            raise ValueError(f"state[{key!r}] must be contiguous (it is written in place)")
        return t

    c_ema = state_tensor("c_ema", (count, d_in))
    if schedule_free:
        s_sum = state_tensor("sf_lr2_sum", (count,))
        c_sum = state_tensor("sf_c_lr2_sum", (count, d_in))
        c_last = state_tensor("c_last", (count, d_in))
    if first is None:
        first = "energy_ref" not in state
    if "energy_ref" not in state:
        state["energy_ref"] = torch.empty(count, dtype=torch.float32, device=device)
    e_ref = state_tensor("energy_ref", (count,))

    first_t: Tensor | None = None
    first_v = 0
    if isinstance(first, Tensor):
        check_shape("first", first, (count,))
        if first.is_floating_point() or first.is_complex():
            raise TypeError(f"first must be a bool or integer tensor, got {first.dtype}")
        check_same_device("first", first, device)
        if not first.is_contiguous():
            raise ValueError("first must be contiguous (it is cleared in place)")
        first_t = first.view(torch.uint8) if first.dtype == torch.bool else first
    elif isinstance(first, bool):
        first_v = int(first)
    else:
        raise TypeError(f"first must be a bool, a tensor or None, got {type(first).__name__}")
    step_t, step_v, step_stride = _step_arg(step, count, device)
    lr_t, _ = scalar_or_tensor("lr", lr, device)
    # lr*lr in double, rounded once (the reference adds the Python float lr*lr)
    lr2_v = f32(float(lr) * float(lr)) if lr_t is None else 0.0
    if isinstance(clip_period, bool) or not isinstance(clip_period, int) or clip_period < 1:
        raise ValueError(f"clip_period must be an int >= 1, got {clip_period!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")

    applied = out_or_new("out", out, (count, d_in), torch.float32, device)
    if not applied.is_contiguous():
        raise ValueError("out must be contiguous")
    e_cur = None
    if energy_cur_out is not None:
        e_cur = out_or_new("energy_cur_out", energy_cur_out, (count,), torch.float32, device)

    blk, num_warps = vector_block_config(d_in, props_for(energy, props), block)
    any_t = c_ema  # stands in for pointer arguments a constexpr flag leaves unused
    launch = Launch(
        _gate_kernel,
        (count,),
        (
            energy, energy.stride(0), energy.stride(1),
            e_ref, c_ema, applied, e_cur if e_cur is not None else any_t,
            s_sum if schedule_free else any_t,
            c_sum if schedule_free else any_t,
            c_last if schedule_free else any_t,
            first_t if first_t is not None else any_t,
            step_t if step_t is not None else any_t,
            lr_t if lr_t is not None else any_t,
            first_v, step_v, lr2_v, step_stride,
            d_in, k, warmup_steps, clip_period,
            f32(clip_alpha), f32(clip_min), f32(clip_trigger if clip_trigger is not None else 0.0),
            f32(clip_beta), f32(1.0 - clip_beta), f32(energy_beta), f32(1.0 - energy_beta),
            f32(energy_eps), f32(sf_mix), f32(1.0 - sf_mix), f32(sf_eps),
        ),
        dict(
            FIRST_PTR=first_t is not None, STEP_PTR=step_t is not None, LR_PTR=lr_t is not None,
            SCHEDULE_FREE=bool(schedule_free), HAS_TRIGGER=clip_trigger is not None,
            WRITE_ECUR=e_cur is not None, BLOCK=blk, ONE_BLOCK=d_in <= blk,
            num_warps=num_warps, enable_fp_fusion=False,
        ),
    )
    return Prepared([launch], applied)


gate_stage_ = public_op(prepare_gate_stage, "gate_stage_")


__all__ = ["gate_stage_", "kth_smallest", "prepare_gate_stage", "prepare_kth_smallest"]
