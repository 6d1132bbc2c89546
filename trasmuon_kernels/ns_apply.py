"""The Newton–Schulz update product C = s * (alpha * Y + L @ R) for a stack (docs/rule.md, step 3).

One step's ``X <- a*X + B X`` is this kernel with the a*X term fused into the epilogue:

* wide (m <= n), X stored as (m, n): L = B (m x m), R = X, Y = X;
* tall (m > n), the iteration runs on X = P^T where P (m x n) is what is stored, and
  B X = (P B)^T because B is exactly symmetric, so the kernel computes P' = a*P + P @ B:
  L = P, R = B (n x n), Y = P. The output keeps the input's (m, n) layout, so neither the
  input nor the result is ever transposed in memory.

In both cases C has the shape (m, n) of the original matrix, rows of C are rows of O. On the
first step ``s = 1 / (sqrt(fro_sumsq[b]) + eps)`` applies the Frobenius normalization to the
raw input (``fro_sumsq=``); B was computed from the normalized Gram matrix, so
s * (a*X0 + B X0) is exactly a*X + B X with X = s*X0.

With ``row_sumsq_out=`` the epilogue also reduces sum_j bf16(C)_ij^2 of its tile (docs/rule.md,
step 4: the row second moment of the final O): each column tile writes its partial sums to
``partials[b, tile_n, i]`` (no atomics) and one ``torch.sum`` over the tile axis (a
``TorchLaunch`` of the prepared list) adds them, so the result is deterministic; with a single column tile
the kernel writes ``row_sumsq_out`` directly.

fp32 accumulation, one rounding to bf16 (round to nearest even), like ``torch.baddbmm`` in
bf16. One launch for the whole stack; grouped tile order (GROUP_M) for L2 reuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import check_device, interpreting, props_for, workspace_or_new
from ._launch import DeviceProps, Launch, Prepared, TorchLaunch, public_op
from ._ns_jit import as_f32, bf16_to_f32, dot_k_loop, round_to_bf16, tile_offset
from .gram import TWO_BLOCKS_MAXNREG


@dataclass(frozen=True)
class ApplyConfig:
    """Tile config of the update product: BLOCK_M x BLOCK_N output tiles, BLOCK_K of the inner
    dimension per iteration, GROUP_M row tiles per group of the tile order. ``maxnreg``: a cap
    on registers per thread (ptxas ``.maxnreg``), None for the compiler's choice."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None


@triton.jit
def _ns_apply_kernel(
    l_ptr,
    r_ptr,
    y_ptr,
    c_ptr,
    sumsq_ptr,
    rsq_ptr,
    M,
    N,
    K,
    tiles_m,
    tiles_n,
    stride_lb,
    stride_lm,
    stride_lk,
    stride_rb,
    stride_rk,
    stride_rn,
    stride_yb,
    stride_ym,
    stride_yn,
    stride_cb,
    stride_cm,
    stride_cn,
    stride_qb,
    stride_qt,
    stride_qm,
    alpha,
    eps,
    HAS_SUMSQ: tl.constexpr,
    ROW_SUMSQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles = tiles_m * tiles_n
    batch = pid // n_tiles
    t = pid - batch * n_tiles
    # Grouped order: GROUP_M row tiles sweep the column tiles together (L2 reuse of R).
    per_group = GROUP_M * tiles_n
    first_m = (t // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (t % per_group) % group_rows
    pid_n = (t % per_group) // group_rows
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = (row0 + offs_m) < M
    n_ok = (col0 + offs_n) < N

    l_ptrs = (
        l_ptr
        + tile_offset(batch, stride_lb, row0, stride_lm, 0, stride_lk)
        + (offs_m[:, None] * stride_lm + offs_k[None, :] * stride_lk)
    )
    r_ptrs = (
        r_ptr
        + tile_offset(batch, stride_rb, 0, stride_rk, col0, stride_rn)
        + (offs_k[:, None] * stride_rk + offs_n[None, :] * stride_rn)
    )
    acc = dot_k_loop(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), l_ptrs, r_ptrs,
                     stride_lk, stride_rk, m_ok, n_ok, offs_k, K, BLOCK_K, UPCAST)

    # Epilogue: + alpha * Y, normalization, one rounding, optional row sums of squares.
    mask = m_ok[:, None] & n_ok[None, :]
    y_ptrs = (
        y_ptr
        + tile_offset(batch, stride_yb, row0, stride_ym, col0, stride_yn)
        + (offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn)
    )
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    acc = acc + alpha * as_f32(y, UPCAST)
    if HAS_SUMSQ:
        s = 1.0 / (tl.sqrt_rn(tl.load(sumsq_ptr + batch).to(tl.float32)) + eps)
        acc = acc * s
    c16 = round_to_bf16(acc, UPCAST)
    c_ptrs = (
        c_ptr
        + tile_offset(batch, stride_cb, row0, stride_cm, col0, stride_cn)
        + (offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn)
    )
    tl.store(c_ptrs, c16, mask=mask)
    if ROW_SUMSQ:
        q = bf16_to_f32(c16, UPCAST)
        q = tl.where(mask, q * q, 0.0)
        part = tl.sum(q, axis=1)
        q_ptrs = (
            rsq_ptr
            + tile_offset(batch, stride_qb, pid_n, stride_qt, row0, stride_qm)
            + offs_m * stride_qm
        )
        tl.store(q_ptrs, part, mask=m_ok)


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------
def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(1, n)))


def _clamp(cfg: ApplyConfig, m: int, n: int, k: int) -> ApplyConfig:
    return ApplyConfig(
        block_m=min(cfg.block_m, _pow2_at_least(m)),
        block_n=min(cfg.block_n, _pow2_at_least(n)),
        block_k=min(cfg.block_k, _pow2_at_least(k)),
        group_m=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        maxnreg=cfg.maxnreg,
    )


# GPU tiles, largest first: the heuristic takes the first that still gives every SM a tile.
# The 128x128 tile is capped at 128 registers per thread: two blocks of 8 warps per SM.
_GPU_APPLY_TILES = (
    ApplyConfig(128, 128, 64, 8, 8, 3, maxnreg=TWO_BLOCKS_MAXNREG),
    ApplyConfig(64, 128, 64, 8, 4, 4),
    ApplyConfig(64, 64, 64, 8, 4, 4),
)


def default_apply_config(batch: int, m: int, n: int, k: int, props: DeviceProps) -> ApplyConfig:
    """Heuristic tile config for C (batch, m, n) with inner size k.

    GPU: 128x128x64 (8 warps, 3 stages) when there are at least as many tiles as SMs,
    otherwise 64x128 then 64x64 (4 warps, 4 stages); every block is capped to the smallest
    power of two >= 16 covering its dimension, so a 7x1 matrix runs 16x16 tiles.
    Interpreter: 64x64x64 (capped likewise): the interpreter's cost is per program and per
    op, so larger tiles are faster there; tests pass explicit small configs for coverage.
    """
    if not props.is_cuda:
        return _clamp(ApplyConfig(64, 64, 64, 4, 4, 1), m, n, k)
    for cfg in _GPU_APPLY_TILES:
        c = _clamp(cfg, m, n, k)
        if batch * triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n) >= props.sm_count:
            return c
    return _clamp(_GPU_APPLY_TILES[-1], m, n, k)


def apply_candidates(m: int, n: int, k: int, props: DeviceProps) -> list[ApplyConfig]:
    """Configs the opt-in autotuner tries for this shape (deduplicated after capping)."""
    if not props.is_cuda:
        raw = [ApplyConfig(bm, bn, 32, 4, 4, 1) for bm in (16, 32) for bn in (16, 32)]
    else:
        raw = []
        for bm, bn, warps in (
            (64, 64, 4),
            (64, 128, 4),
            (128, 64, 4),
            (128, 128, 8),
            (128, 256, 8),
        ):
            for bk in (32, 64):
                for stages in (3, 4):
                    raw.append(ApplyConfig(bm, bn, bk, 8, warps, stages))
    seen: list[ApplyConfig] = []
    for cfg in raw:
        c = _clamp(cfg, m, n, k)
        if c not in seen:
            seen.append(c)
    return seen


def row_partial_tiles(n: int, config: ApplyConfig) -> int:
    """How many column tiles write row partial sums (the partial buffer's middle size)."""
    return triton.cdiv(n, config.block_n)


def row_partial_size(batch: int, m: int, n: int, config: ApplyConfig) -> int:
    """Elements of the ``row_partials`` buffer a call with ``row_sumsq_out`` needs (0: the
    kernel writes ``row_sumsq_out`` directly, one column tile)."""
    tiles = row_partial_tiles(n, config)
    return 0 if tiles == 1 else batch * tiles * m


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def prepare_ns_apply(
    left: torch.Tensor,
    right: torch.Tensor,
    addend: torch.Tensor,
    out: torch.Tensor,
    *,
    alpha: float,
    fro_sumsq: torch.Tensor | None = None,
    eps: float = 0.0,
    row_sumsq_out: torch.Tensor | None = None,
    row_partials: torch.Tensor | None = None,
    config: ApplyConfig | None = None,
    props: DeviceProps | None = None,
) -> Prepared:
    """out = s * (alpha * addend + left @ right), rounded once to bf16: the product kernel
    and, when the row sums span several column tiles, the ``torch.sum`` over their partials
    (a ``TorchLaunch``); ``result`` is ``out``.

    left: (B, M, K), right: (B, K, N), addend: (B, M, N), any float dtype (rounded to bf16 on
    load) and any strides; out: (B, M, N) bf16, must not overlap the inputs. fro_sumsq:
    (B,) fp32, s = 1 / (sqrt(fro_sumsq) + eps) when given, else 1. row_sumsq_out: (B, M)
    fp32, receives sum_j out_ij^2 of the bf16 output. row_partials: optional preallocated
    contiguous fp32 buffer of at least ``row_partial_size(B, M, N, config)`` elements for the
    partial row sums (allocated here when needed and not given). ``props``: the device the
    default config is chosen for (default: ``left``'s)."""
    check_device("left", left, props)
    if not (left.ndim == right.ndim == addend.ndim == out.ndim == 3):
        raise ValueError("ns_apply expects 3D (B, rows, cols) tensors")
    batch, m, k = left.shape
    n = right.shape[2]
    if right.shape != (batch, k, n) or addend.shape != (batch, m, n):
        raise ValueError(
            f"shape mismatch: left {tuple(left.shape)}, right {tuple(right.shape)}, addend {tuple(addend.shape)}"
        )
    if out.shape != (batch, m, n) or out.dtype != torch.bfloat16:
        raise ValueError(f"out must be a bf16 tensor of shape {(batch, m, n)}")
    if fro_sumsq is not None and fro_sumsq.shape != (batch,):
        raise ValueError(f"fro_sumsq must have shape {(batch,)}")
    if row_sumsq_out is not None and (
        row_sumsq_out.shape != (batch, m) or row_sumsq_out.dtype != torch.float32
    ):
        raise ValueError(f"row_sumsq_out must be a float32 tensor of shape {(batch, m)}")
    if batch == 0 or m == 0 or n == 0:
        if row_sumsq_out is None:
            return Prepared([], out)
        rsq = row_sumsq_out
        return Prepared([TorchLaunch("zero_row_sumsq", rsq.zero_, (rsq,))], out)
    cfg = config or default_apply_config(batch, m, n, k, props_for(left, props))
    tiles_m = triton.cdiv(m, cfg.block_m)
    tiles_n = triton.cdiv(n, cfg.block_n)

    partials = None
    if row_sumsq_out is not None:
        if tiles_n == 1:
            partials = row_sumsq_out.unsqueeze(1)  # the kernel writes the final sums
        else:
            need = row_partial_size(batch, m, n, cfg)
            buf = workspace_or_new("row_partials", row_partials, need, out.device)
            partials = buf.view(batch, tiles_n, m)
    q_arg = partials if partials is not None else out
    s_arg = fro_sumsq if fro_sumsq is not None else out
    launches: list = [
        Launch(
            _ns_apply_kernel,
            (batch * tiles_m * tiles_n,),
            (
                left, right, addend, out, s_arg, q_arg,
                m, n, k, tiles_m, tiles_n,
                left.stride(0), left.stride(1), left.stride(2),
                right.stride(0), right.stride(1), right.stride(2),
                addend.stride(0), addend.stride(1), addend.stride(2),
                out.stride(0), out.stride(1), out.stride(2),
                q_arg.stride(0), q_arg.stride(1), q_arg.stride(2),
                float(alpha), float(eps),
            ),
            dict(
                HAS_SUMSQ=fro_sumsq is not None,
                ROW_SUMSQ=row_sumsq_out is not None,
                BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k,
                GROUP_M=cfg.group_m,
                UPCAST=interpreting(),
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
            ),
        )
    ]
    if partials is not None and tiles_n > 1:
        rsq = row_sumsq_out
        launches.append(TorchLaunch(
            "sum_row_partials",
            lambda: torch.sum(partials, dim=1, out=rsq),
            (partials, rsq),
        ))
    return Prepared(launches, out)


ns_apply = public_op(prepare_ns_apply, "ns_apply")
