"""Multi-tensor AdamW: one launch updates N tensors of any shapes (``reference.adamw_foreach_step_``).

The optimizer's non-matrix parameters (biases, norm gains, embeddings) take AdamW. torch's fused
AdamW keeps its state in the param's dtype, so a bf16 param cannot have float32 moments there;
this kernel reads each element of W, G, m and v once and writes W, m and v once (22 B per element
for a bf16 param with float32 moments), for all N tensors in one launch:

    m <- lerp(m, g, 1-b1)                 (ATen's fma form, ``momentum_energy.lerp``)
    v <- fma((1-b2)*g, g, b2*v)          (ATen's CPU addcmul after the mul)
    W <- (1 - lr*wd)*W - ((lr/(1-b1^t)) * m) / (sqrt(v)/sqrt(1-b2^t) + eps)

all in float32, W rounded once to its dtype. The bias corrections are computed on the device in
float32 from each tensor's step t (the reference computes them in double on the host), so the
result agrees with the reference to float32 rounding, not bit for bit.

Programs cover fixed-size blocks of elements. A per-program int32 table gives each program its
tensor and its block in that tensor; an int64 table holds the N addresses of each of W, G, m, v
and the N element counts. Both tables are built and uploaded once by ``prepare_adamw``; the
returned launch reads the steps and lr from device memory, so it can be replayed every step
(inside a CUDA graph too) without any argument changing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    FLOAT_DTYPES,
    GPU_TILE,
    INTERPRETER_TILE,
    check_device,
    device_fn,
    f32,
    interpreting,
    log_beta,
    matrix_base,
    next_pow2,
    one_minus_pow,
    props_for,
    round_to,
    saturate,
    scalar_or_tensor,
    upload_table,
)
from ._launch import DeviceProps, Launch, Prepared, TorchLaunch, public_op
from .momentum_energy import lerp, lerp_weights
from .update import decay_factor

# Smallest GPU block: 4 warps x 32 threads x one 16-byte vector of float32 each.
_GPU_MIN_BLOCK = 512
_GPU_MAXNREG = 128  # 8 warps x 32 threads x 128 registers: two blocks per SM on sm_90
# GPU blocks drop from GPU_TILE to half of it when the launch would be under this many
# programs per SM (more, smaller programs fill the GPU when there is little work).
_GPU_PROGRAMS_PER_SM = 4
# Largest block: Triton's limit on elements per tensor.
_MAX_BLOCK = 1 << 20
# Steps are float32 on the device: integers are exact up to 2^24.
_MAX_STEP = 1 << 24


# --------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------
@device_fn
def _load(ptr, idx, rem, MASKED: tl.constexpr):
    # Full blocks load without a mask: a mask against a count read from a table has no known
    # divisibility, which would split GPU loads into scalars.
    if MASKED:
        x = tl.load(ptr + idx, mask=idx < rem, other=0.0)
    else:
        x = tl.load(ptr + idx)
    return x


@device_fn
def _store(ptr, idx, x, rem, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + idx, x, mask=idx < rem)
    else:
        tl.store(ptr + idx, x)


@device_fn
def _adamw_elements(
    p_ptr, g_ptr, m_ptr, v_ptr, idx, rem,
    w1, w1_m1, beta2, one_minus_beta2, eps, bc2_sqrt, step_size, decay,
    SMALL_W1: tl.constexpr, MASKED: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr,
):
    # Everything in float32 (bf16 arithmetic is garbage in the interpreter), in the
    # reference's order of operations; W is rounded once.
    g = _load(g_ptr, idx, rem, MASKED).to(tl.float32)
    m = _load(m_ptr, idx, rem, MASKED)
    v = _load(v_ptr, idx, rem, MASKED)
    w = _load(p_ptr, idx, rem, MASKED).to(tl.float32)
    m = lerp(m, g, w1, w1_m1, SMALL_W1)
    # ATen's CPU addcmul: fma(value*t1, t2, self); then saturated (reference.saturate)
    v = saturate(tl.fma(one_minus_beta2 * g, g, v * beta2))
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    w = w * decay - tl.div_rn(step_size * m, denom)  # addcdiv: self + (value*t1)/t2
    _store(m_ptr, idx, m, rem, MASKED)
    _store(v_ptr, idx, v, rem, MASKED)
    _store(p_ptr, idx, round_to(w, p_ptr.dtype.element_ty, EMULATE_BF16_RNE), rem, MASKED)


# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------
@triton.jit
def _adamw_kernel(
    p_type, g_type, mv_type, tensor_table, prog_table, steps_ptr, lr_ptr,
    n_tensors,
    step_value, lr_value, decay_value, weight_decay,
    w1, w1_m1, beta2, one_minus_beta2, eps, log_beta1, log_beta2,
    SMALL_W1: tl.constexpr, STEPS_PTR: tl.constexpr, LR_PTR: tl.constexpr,
    ALIGNED: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program: one BLOCK of one tensor. p_type/g_type/mv_type are the first tensors of
    # their lists, passed only for their element types. tensor_table is (5, N) int64: the
    # addresses of W, G, m, v, then the element counts; prog_table is (P, 2) int32:
    # (tensor, block in that tensor) per program.
    pid = tl.program_id(0).to(tl.int64)
    tid = tl.load(prog_table + 2 * pid)
    blk = tl.load(prog_table + 2 * pid + 1)
    numel = tl.load(tensor_table + 4 * n_tensors + tid)
    p_ptr = matrix_base(p_type, tensor_table, tid, 0, True, ALIGNED)
    g_ptr = matrix_base(g_type, tensor_table + n_tensors, tid, 0, True, ALIGNED)
    m_ptr = matrix_base(mv_type, tensor_table + 2 * n_tensors, tid, 0, True, ALIGNED)
    v_ptr = matrix_base(mv_type, tensor_table + 3 * n_tensors, tid, 0, True, ALIGNED)

    # Per-tensor scalars, from device memory so that replays see the current step and lr.
    if STEPS_PTR:
        t = tl.load(steps_ptr + tid).to(tl.float32)
    else:
        t = step_value
    bc1 = one_minus_pow(log_beta1, t)
    bc2_sqrt = tl.sqrt_rn(one_minus_pow(log_beta2, t))
    if LR_PTR:
        lr = tl.load(lr_ptr).to(tl.float32)
        decay = 1.0 - lr * weight_decay  # float32, as the reference's lr_tensor*wd
    else:
        lr = lr_value
        decay = decay_value  # 1 - lr*wd in double on the host, rounded once
    step_size = tl.div_rn(lr, bc1)

    # int64 block start (a tensor may exceed 2^31 elements); offsets in the block are int32.
    start = blk.to(tl.int64) * BLOCK
    rem = numel - start
    idx = tl.arange(0, BLOCK)
    if rem >= BLOCK:
        _adamw_elements(
            p_ptr + start, g_ptr + start, m_ptr + start, v_ptr + start, idx, rem,
            w1, w1_m1, beta2, one_minus_beta2, eps, bc2_sqrt, step_size, decay,
            SMALL_W1, False, EMULATE_BF16_RNE,
        )
    else:
        _adamw_elements(
            p_ptr + start, g_ptr + start, m_ptr + start, v_ptr + start, idx, rem,
            w1, w1_m1, beta2, one_minus_beta2, eps, bc2_sqrt, step_size, decay,
            SMALL_W1, True, EMULATE_BF16_RNE,
        )


# --------------------------------------------------------------------------------------
# Launch config
# --------------------------------------------------------------------------------------
class AdamWConfig(NamedTuple):
    block: int  # elements per program (a power of two)
    num_warps: int
    # Registers per thread, capped where uncapped compiles exceed what two blocks per SM
    # allow (Triton 3.6 gave 146 at 8 warps with fp32 params: one block per SM); None: no cap.
    maxnreg: int | None = None


def _warps(block: int) -> int:
    return 8 if block >= GPU_TILE else 4


def adamw_config(numels: Sequence[int], props: DeviceProps) -> AdamWConfig:
    """Block size and warps for tensors of ``numels`` elements on ``props``'s device.

    GPU: GPU_TILE (4096) elements and 8 warps per program (16 float32 per thread, four 16-byte
    vectors per operand); half that with 4 warps when the launch would have fewer than
    ``_GPU_PROGRAMS_PER_SM`` programs per SM; never much more than the largest tensor (at least
    512). Interpreter: one block as large as the largest tensor, up to INTERPRETER_TILE (it pays
    per program, not per element)."""
    largest = max((int(n) for n in numels), default=0)
    cap = next_pow2(max(largest, 1))
    if props.is_cuda:
        block = GPU_TILE
        programs = sum(triton.cdiv(int(n), GPU_TILE) for n in numels)
        if programs < _GPU_PROGRAMS_PER_SM * props.sm_count:
            block = GPU_TILE // 2
        block = min(block, max(_GPU_MIN_BLOCK, cap))
        warps = _warps(block)
        return AdamWConfig(block=block, num_warps=warps, maxnreg=_GPU_MAXNREG if warps == 8 else None)
    block = min(INTERPRETER_TILE, max(16, cap))
    return AdamWConfig(block=block, num_warps=_warps(block))


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------
def _tensor_list(name: str, value: Sequence[Tensor]) -> list[Tensor]:
    if isinstance(value, Tensor) or not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
    tensors = list(value)
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, not a tensor")
    return tensors


def _check_list(
    name: str, tensors: list[Tensor], allowed: Sequence[torch.dtype], device: torch.device,
    shapes: list[torch.Size] | None,
) -> None:
    """One dtype among ``allowed`` for the whole list, one device, contiguous, and (when
    ``shapes`` is given) the shapes of the params."""
    names = ", ".join(str(d).replace("torch.", "") for d in allowed)
    dtype = tensors[0].dtype
    if dtype not in allowed:
        raise TypeError(f"{name}[0] has dtype {dtype}; expected one of {names}")
    for i, t in enumerate(tensors):
        if t.dtype != dtype:
            raise TypeError(
                f"{name}[{i}] has dtype {t.dtype}, but {name}[0] has {dtype}: one launch takes "
                f"one dtype per list"
            )
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device}, but params[0] is on {device}")
        if shapes is not None and t.shape != shapes[i]:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(t.shape)}, but params[{i}] has shape {tuple(shapes[i])}"
            )
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] is not contiguous (strides {t.stride()})")


def _check_no_aliasing(lists: dict[str, list[Tensor]]) -> None:
    """The written tensors (params, exp_avgs, exp_avg_sqs) must not share a start address."""
    seen: dict[int, str] = {}
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if t.numel() == 0:
                continue
            where = f"{name}[{i}]"
            if t.data_ptr() in seen:
                raise ValueError(f"{where} is the same memory as {seen[t.data_ptr()]}; both are written")
            seen[t.data_ptr()] = where


def _check_float(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_betas(betas: tuple[float, float]) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair of floats (beta1, beta2), got {betas!r}")
    out = []
    for i, b in enumerate(betas):
        b = _check_float(f"betas[{i}]", b)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")
        out.append(b)
    return out[0], out[1]


def _check_steps(steps: Tensor | int, n: int, device: torch.device) -> tuple[Tensor | None, float]:
    if isinstance(steps, Tensor):
        if tuple(steps.shape) != (n,):
            raise ValueError(f"steps has shape {tuple(steps.shape)}; expected ({n},), one step per tensor")
        if steps.dtype != torch.float32:
            raise TypeError(f"steps has dtype {steps.dtype}; expected float32")
        if steps.device != device:
            raise ValueError(f"steps is on {steps.device}, but params[0] is on {device}")
        if not steps.is_contiguous():
            raise ValueError(f"steps is not contiguous (strides {steps.stride()})")
        return steps, 0.0
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int or a float32 device tensor, got {type(steps).__name__}")
    if not 1 <= steps <= _MAX_STEP:
        raise ValueError(f"steps must be a 1-based step count in [1, 2^24], got {steps}")
    return None, float(steps)


def _check_block(block: int | None) -> None:
    if block is None:
        return
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block > _MAX_BLOCK or block & (block - 1):
        raise ValueError(f"block must be None or a power of two in [16, 2^20], got {block!r}")


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AdamWLaunch(Launch):
    """The launch of one AdamW step; ``update_grads`` points it at new gradient tensors (in
    place: the launch's arguments do not change)."""

    def update_grads(self, grads: Sequence[Tensor]) -> None:
        """Write the addresses of ``grads`` (same shapes, dtype and 16-byte alignment as the
        ones prepared with) into the launch's address table."""
        table = self.args[3]  # (5, N): addresses of W, G, m, v; element counts
        n = table.shape[1]
        grads = list(grads)
        if len(grads) != n:
            raise ValueError(f"grads has {len(grads)} tensors, but the launch updates {n}")
        ptrs = [g.data_ptr() for g in grads]
        if self.meta["ALIGNED"] and any(p % 16 for p in ptrs):
            raise ValueError("the new gradients are not 16-byte aligned; prepare the launch again")
        host = torch.tensor(ptrs, dtype=torch.int64)
        if table.is_cuda:
            host = host.pin_memory()  # a non-blocking copy from pinned memory: no host sync
        row = table[1]
        TorchLaunch("copy(grad addresses)", lambda: row.copy_(host, non_blocking=True), (row, host))()


def prepare_adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    steps: Tensor | int,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    props: DeviceProps | None = None,
    block: int | None = None,
) -> Prepared:
    """One AdamW step for N tensors in one launch (or none when there is no element to update);
    ``result`` is None. Eager twin: ``reference.adamw_foreach_step_``.

    ``params``: N contiguous tensors of any shapes, one dtype among fp32/bf16/fp16, updated in
    place. ``grads``: the same shapes, contiguous, one dtype among fp32/bf16/fp16.
    ``exp_avgs``, ``exp_avg_sqs``: float32, same shapes, contiguous, updated in place. All on
    one device. ``steps``: (N,) float32 device tensor of each tensor's 1-based step t (already
    incremented; read by the kernel), or an int for all. ``lr``: one-element float device
    tensor (read by the kernel) or a float. ``betas``, ``eps``, ``weight_decay``: constants.
    ``props``: the device facts the block size depends on (default: the params' device).
    ``block``: elements per program, overriding ``adamw_config``.

    The launch holds the addresses of all 4N tensors: replaying it updates the same tensors,
    reading whatever their memory (and ``steps``, ``lr``) holds at that time. A float ``lr`` or
    an int ``steps`` is baked into the launch. Prepare outside CUDA graph capture (it uploads
    the tables); the launch itself can be captured and replayed.
    """
    lists = {
        "params": _tensor_list("params", params),
        "grads": _tensor_list("grads", grads),
        "exp_avgs": _tensor_list("exp_avgs", exp_avgs),
        "exp_avg_sqs": _tensor_list("exp_avg_sqs", exp_avg_sqs),
    }
    n = len(lists["params"])
    for name, tensors in lists.items():
        if len(tensors) != n:
            raise ValueError(f"{name} has {len(tensors)} tensors, but params has {n}")
    beta1, beta2 = _check_betas(betas)
    eps = _check_float("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    weight_decay = _check_float("weight_decay", weight_decay)
    _check_block(block)
    if props is not None and not isinstance(props, DeviceProps):
        raise TypeError(f"props must be a DeviceProps or None, got {type(props).__name__}")
    if n == 0:
        return Prepared([], None)
    p_list, g_list, m_list, v_list = lists.values()
    check_device("params[0]", p_list[0], props)
    device = p_list[0].device
    shapes = [p.shape for p in p_list]
    _check_list("params", p_list, FLOAT_DTYPES, device, None)
    _check_list("grads", g_list, FLOAT_DTYPES, device, shapes)
    _check_list("exp_avgs", m_list, (torch.float32,), device, shapes)
    _check_list("exp_avg_sqs", v_list, (torch.float32,), device, shapes)
    _check_no_aliasing({"params": p_list, "exp_avgs": m_list, "exp_avg_sqs": v_list})
    steps_t, step_v = _check_steps(steps, n, device)
    lr_t, lr_v = scalar_or_tensor("lr", lr, device)

    numels = [p.numel() for p in p_list]
    config = adamw_config(numels, props_for(p_list[0], props))
    if block is not None:
        config = AdamWConfig(block=block, num_warps=_warps(block))
    counts = [triton.cdiv(k, config.block) for k in numels]
    total = sum(counts)
    if total == 0:
        return Prepared([], None)
    if total >= 2**31:
        raise ValueError(f"{total} programs of {config.block} elements exceed the grid; pass a larger block")

    addresses = [[t.data_ptr() for t in lst] for lst in (p_list, g_list, m_list, v_list)]
    aligned = all(a % 16 == 0 for row in addresses for a, k in zip(row, numels, strict=True) if k)
    tensor_table = upload_table(torch.tensor([*addresses, numels], dtype=torch.int64), device)  # (5, N)
    counts_t = torch.tensor(counts, dtype=torch.int64)
    tid = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts_t)
    first = torch.cumsum(counts_t, 0) - counts_t
    blk = torch.arange(total, dtype=torch.int64) - first[tid]
    prog_table = upload_table(torch.stack([tid, blk], dim=1).to(torch.int32), device)  # (P, 2)

    w1, w1_m1, small_w1 = lerp_weights(1.0 - beta1)
    log_b = [log_beta(b) for b in (beta1, beta2)]
    decay_v = decay_factor(float(lr), weight_decay) if lr_t is None else 0.0
    any_t = tensor_table  # stands in for pointer arguments a constexpr flag leaves unused
    # The gradient argument only types the kernel's pointers: a buffer of ours, so that the
    # launch holds no gradient alive (gradients are reallocated, see ``update_grads``).
    g_type = torch.empty(8, dtype=g_list[0].dtype, device=device)
    args = (
        p_list[0], g_type, m_list[0], tensor_table, prog_table,
        steps_t if steps_t is not None else any_t, lr_t if lr_t is not None else any_t,
        n,
        step_v, lr_v, decay_v, f32(weight_decay),
        w1, w1_m1, f32(beta2), f32(1.0 - beta2), f32(eps), log_b[0], log_b[1],
    )
    meta = dict(
        SMALL_W1=small_w1, STEPS_PTR=steps_t is not None, LR_PTR=lr_t is not None,
        ALIGNED=aligned, EMULATE_BF16_RNE=interpreting(), BLOCK=config.block,
        num_warps=config.num_warps, enable_fp_fusion=False,
        **({"maxnreg": config.maxnreg} if config.maxnreg else {}),
    )
    keep = tuple(t for lst in (p_list, m_list, v_list) for t in lst)
    launch = AdamWLaunch(_adamw_kernel, (total,), args, meta, name="adamw", keepalive=keep)
    return Prepared([launch], None)


adamw_step_ = public_op(prepare_adamw, "adamw_step_")


__all__ = ["AdamWConfig", "AdamWLaunch", "adamw_config", "adamw_step_", "prepare_adamw"]
