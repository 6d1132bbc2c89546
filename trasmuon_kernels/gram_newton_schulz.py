"""Batched bf16 Newton–Schulz in its Gram form (docs/kernels-newton-schulz.md, "Gram
Newton–Schulz"; docs/rule.md).

Semantics are those of ``trasmuon.reference.gram_newton_schulz`` for an explicit schedule and
restarts: the standard iteration's polynomial, iterated on the s x s matrix R = X X^T (s the
short side) instead of the s x l matrix X. Per segment of steps (the steps cut after each
restart r, 0 < r < steps):

1. ``gram.sym_gram``: R = X X^T (upper tiles, mirrored; X^T X straight from a tall matrix;
   the Frobenius normalization folded in on the first segment, as in the standard form);
2. per (a, b, c): ``gram.sym_gram``: Z = b R + c R R (upper tiles, mirrored);
   Q = a I + Z at the segment's first step (``_add_identity_kernel``, here), later
   ``ns_apply``: Q <- a Q + Z Q; unless it is the segment's last step, ``ns_apply`` twice:
   T = a R + R Z, R <- a T + Z T (R <- P R P with P = a I + Z), then
   ``_mirror_upper_kernel`` makes R exactly symmetric again (its upper triangle mirrored, as
   the reference does);
3. ``ns_apply``: X <- Q X (tall: P <- P Q^T on the stored layout, Q^T read by swapped
   strides), scaled by the normalization on the first segment; on the last segment it writes
   ``out`` and, with ``row_sumsq_out=``, the row sums of squares of O.

Every product accumulates in fp32 and rounds once to bf16, as in the reference. Buffers:
four (B, s, s) bf16 matrices (R, Z and Q's two ping-pong buffers, one of which holds T while
R is updated), a (B, m, n) spare when there is a restart, and the small reduction buffers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import check_device, interpreting, props_for
from ._launch import DeviceProps, Launch, Prepared, device_props, public_op
from ._ns_jit import as_f32, round_to_bf16, tile_offset, upper_tile
from .fro_sumsq import fro_sumsq_partial_size, prepare_fro_sumsq
from .gram import num_upper_tiles, prepare_sym_gram
from .newton_schulz import (
    NSConfig,
    NSTriple,
    _buffer,
    _checked_out,
    _partials,
    _prepare_checked,
    _shares_storage,
    check_schedule,
    default_config,
)
from .ns_apply import ApplyConfig, default_apply_config, prepare_ns_apply, row_partial_size

__all__ = [
    "GramNSConfig",
    "GramNSWorkspace",
    "default_gram_ns_config",
    "gram_newton_schulz",
    "gram_newton_schulz_workspace",
    "gram_segments",
    "prepare_add_identity",
    "prepare_gram_newton_schulz",
    "prepare_mirror_upper",
]


@dataclass(frozen=True, kw_only=True)
class GramNSConfig(NSConfig):
    """The standard form's configs (``NSConfig``: the Gram product X X^T, the polynomial
    R R, the (m, n) product Q X as ``apply``, the first segment's for a 4-byte input) and
    the s x s products of Q and R (``square``)."""

    square: ApplyConfig


@dataclass
class GramNSWorkspace:
    """Preallocated buffers (any may be None: allocated by the prepare call). For B matrices
    (m, n), s = min(m, n): x (B, m, n) bf16, the spare of a restart; r, z, qa, qb (B, s, s)
    bf16; fro (B,) fp32; partials: contiguous fp32 (see :func:`gram_newton_schulz_workspace`)."""

    x: torch.Tensor | None = None
    r: torch.Tensor | None = None
    z: torch.Tensor | None = None
    qa: torch.Tensor | None = None
    qb: torch.Tensor | None = None
    fro: torch.Tensor | None = None
    partials: torch.Tensor | None = None


def gram_segments(steps: int, restarts: Sequence[int]) -> tuple[int, ...]:
    """The lengths of the segments: ``steps`` cut after each restart r with 0 < r < steps
    (``trasmuon.reference.gram_segments``; restarts at or past the last step are ignored)."""
    cuts = sorted({int(r) for r in restarts if 0 < r < steps})
    bounds = (0, *cuts, steps)
    return tuple(hi - lo for lo, hi in itertools.pairwise(bounds) if hi > lo)


def _check_restarts(restarts: Sequence[int]) -> tuple[int, ...]:
    if isinstance(restarts, (str, bytes)) or not isinstance(restarts, Sequence) or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in restarts):
        raise TypeError(f"restarts must be a sequence of ints >= 1, got {restarts!r}")
    return tuple(restarts)


def default_gram_ns_config(batch: int, m: int, n: int, props: DeviceProps,
                           input_itemsize: int = 2) -> GramNSConfig:
    """The heuristic configs (those of the standard form for the X-shaped products, see
    ``newton_schulz.default_config``; ``ns_apply.default_apply_config`` for the s x s ones)."""
    base = default_config(batch, m, n, props, input_itemsize)
    d = min(m, n)
    return GramNSConfig(gram=base.gram, poly=base.poly, apply=base.apply,
                        square=default_apply_config(batch, d, d, d, props),
                        first_gram=base.first_gram, first_apply=base.first_apply)


def gram_newton_schulz_workspace(
    shape: Sequence[int],
    device: torch.device | str,
    *,
    steps: int,
    restarts: Sequence[int] = (2,),
    config: GramNSConfig | None = None,
    props: DeviceProps | None = None,
) -> GramNSWorkspace:
    """Every buffer a call on a tensor of ``shape`` (``(..., m, n)``) needs, so that repeated
    calls allocate nothing."""
    device = torch.device(device)
    props = props if props is not None else device_props(device)
    *lead, m, n = shape
    batch = math.prod(lead)
    d = min(m, n)
    cfg = config or default_gram_ns_config(batch, m, n, props)

    def square() -> torch.Tensor:
        return torch.empty(batch, d, d, device=device, dtype=torch.bfloat16)

    spare = len(gram_segments(steps, restarts)) > 1
    return GramNSWorkspace(
        x=torch.empty(batch, m, n, device=device, dtype=torch.bfloat16) if spare else None,
        r=square(), z=square(), qa=square(), qb=square(),
        fro=torch.empty(batch, device=device, dtype=torch.float32),
        partials=torch.empty(max(row_partial_size(batch, m, n, cfg.apply),
                                 fro_sumsq_partial_size(batch, m, n, props), 1),
                             device=device, dtype=torch.float32),
    )


# --------------------------------------------------------------------------------------
# Q = a I + Z: the one new kernel
# --------------------------------------------------------------------------------------
@triton.jit
def _add_identity_kernel(
    z_ptr,
    q_ptr,
    n,
    tiles,
    stride_zb,
    stride_zr,
    stride_zc,
    stride_qb,
    stride_qr,
    stride_qc,
    alpha,
    BLOCK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    per_matrix = tiles * tiles
    batch = pid // per_matrix
    t = pid - batch * per_matrix
    ti = t // tiles
    tj = t - ti * tiles
    row0 = ti * BLOCK
    col0 = tj * BLOCK
    offs = tl.arange(0, BLOCK)
    rows = row0 + offs
    cols = col0 + offs
    mask = (rows < n)[:, None] & (cols < n)[None, :]
    z_ptrs = (z_ptr + tile_offset(batch, stride_zb, row0, stride_zr, col0, stride_zc)
              + (offs[:, None] * stride_zr + offs[None, :] * stride_zc))
    z = as_f32(tl.load(z_ptrs, mask=mask, other=0.0), UPCAST)
    acc = z + tl.where(rows[:, None] == cols[None, :], alpha, 0.0)
    q_ptrs = (q_ptr + tile_offset(batch, stride_qb, row0, stride_qr, col0, stride_qc)
              + (offs[:, None] * stride_qr + offs[None, :] * stride_qc))
    tl.store(q_ptrs, round_to_bf16(acc, UPCAST), mask=mask)


@triton.jit
def _mirror_upper_kernel(
    c_ptr,
    n,
    n_tri,
    stride_cb,
    stride_cr,
    stride_cc,
    BLOCK: tl.constexpr,
):
    """In place: C's lower triangle becomes the transpose of its upper one. One program per
    (matrix, upper tile): it reads tile (ti, tj), ti <= tj, and writes its transpose at
    (tj, ti) (a diagonal tile: its lower half), so no two programs touch one element."""
    pid = tl.program_id(0)
    batch = pid // n_tri
    ti, tj = upper_tile(pid - batch * n_tri)
    row0 = ti * BLOCK
    col0 = tj * BLOCK
    offs = tl.arange(0, BLOCK)
    row_ok = (row0 + offs) < n
    col_ok = (col0 + offs) < n
    c_ptrs = (c_ptr + tile_offset(batch, stride_cb, row0, stride_cr, col0, stride_cc)
              + (offs[:, None] * stride_cr + offs[None, :] * stride_cc))
    tile = tl.load(c_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    # Element (i, j) of the tile goes to C[col0 + j, row0 + i]; on the diagonal tile only
    # where j > i (its strict upper half). (Conditions as vectors, as in gram.py.)
    off_diag = (offs * 0 + ti) != tj
    keep = off_diag[:, None] | (offs[None, :] > offs[:, None])
    ct_ptrs = (c_ptr + tile_offset(batch, stride_cb, col0, stride_cr, row0, stride_cc)
               + (offs[:, None] * stride_cc + offs[None, :] * stride_cr))
    tl.store(ct_ptrs, tile, mask=row_ok[:, None] & col_ok[None, :] & keep)


def prepare_mirror_upper(c: torch.Tensor, *, block: int | None = None,
                         props: DeviceProps | None = None) -> Prepared:
    """The launch that makes a (B, s, s) bf16 stack exactly symmetric in place by mirroring
    its upper triangle (``reference.upper_mirrored``; no arithmetic)."""
    check_device("c", c, props)
    if c.ndim != 3 or c.shape[1] != c.shape[2]:
        raise ValueError(f"mirror_upper needs a (B, s, s) stack, got {tuple(c.shape)}")
    batch, d, _ = c.shape
    if batch == 0 or d == 0:
        return Prepared([], c)
    if block is None:
        block = 64 if props_for(c, props).is_cuda else min(64, max(16, triton.next_power_of_2(d)))
    n_tri = num_upper_tiles(d, block)
    launch = Launch(_mirror_upper_kernel, (batch * n_tri,),
                    (c, d, n_tri, c.stride(0), c.stride(1), c.stride(2)),
                    dict(BLOCK=block, num_warps=4))
    return Prepared([launch], c)


def prepare_add_identity(z: torch.Tensor, out: torch.Tensor, alpha: float, *,
                         block: int | None = None, props: DeviceProps | None = None) -> Prepared:
    """The launch of out = bf16(alpha I + Z) for a (B, s, s) stack (fp32 add, one rounding),
    one program per (matrix, BLOCK x BLOCK tile). ``block``: a power of two (default: 64 on a
    GPU, the smallest of 16/32/64 covering s under the interpreter)."""
    check_device("z", z, props)
    if z.ndim != 3 or z.shape[1] != z.shape[2] or out.shape != z.shape or out.dtype != torch.bfloat16:
        raise ValueError(f"add_identity needs a (B, s, s) input and a bf16 output of its shape, "
                         f"got {tuple(z.shape)} and {out.dtype} {tuple(out.shape)}")
    batch, d, _ = z.shape
    if batch == 0 or d == 0:
        return Prepared([], out)
    if block is None:
        block = 64 if props_for(z, props).is_cuda else min(64, max(16, triton.next_power_of_2(d)))
    tiles = triton.cdiv(d, block)
    launch = Launch(
        _add_identity_kernel, (batch * tiles * tiles,),
        (z, out, d, tiles, z.stride(0), z.stride(1), z.stride(2),
         out.stride(0), out.stride(1), out.stride(2), float(alpha)),
        dict(BLOCK=block, UPCAST=interpreting(), num_warps=4),
    )
    return Prepared([launch], out)


# --------------------------------------------------------------------------------------
# The iteration, as a list of launches
# --------------------------------------------------------------------------------------
def prepare_gram_newton_schulz(
    x: torch.Tensor,
    schedule: Sequence[NSTriple],
    eps: float,
    *,
    restarts: Sequence[int] = (2,),
    fro_sumsq: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    row_sumsq_out: torch.Tensor | None = None,
    workspace: GramNSWorkspace | None = None,
    config: GramNSConfig | None = None,
    props: DeviceProps | None = None,
    overwrite_input: bool = False,
) -> Prepared:
    """Orthogonalize ``x`` (``(m, n)`` or ``(..., m, n)``) by Newton–Schulz in its Gram form,
    in bf16: ``trasmuon.reference.gram_newton_schulz(x, schedule, eps, restarts=restarts)``
    up to fp32 summation order. Every launch, in order; ``result`` is ``out`` (bf16, shape of
    ``x``). Arguments as ``newton_schulz.prepare_newton_schulz`` (no autotuning, no custom op
    for torch.compile), plus ``restarts``: the steps after which R is recomputed from X. The
    input is never overwritten (``overwrite_input`` is accepted and has no effect: the input
    is read by the first segment's first and last products)."""
    del overwrite_input
    schedule = check_schedule(schedule)
    restarts = _check_restarts(restarts)
    out = _checked_out(x, fro_sumsq, out, row_sumsq_out)
    check_device("x", x, props)
    if not schedule:  # the normalized input: the same launches as the standard form's
        return _prepare_checked(x, schedule, eps, fro_sumsq=fro_sumsq, out=out,
                                row_sumsq_out=row_sumsq_out, workspace=None, config=None,
                                props=props, overwrite_input=False)
    if _shares_storage(out, x):
        raise ValueError("out must not share memory with x")
    props = props_for(x, props)
    m, n = x.shape[-2:]
    batch = math.prod(x.shape[:-2])
    dev = x.device
    x3 = x.reshape(batch, m, n)
    out3 = out.view(batch, m, n)
    rsq = row_sumsq_out.view(batch, m) if row_sumsq_out is not None else None
    if batch == 0 or m == 0 or n == 0:
        return _prepare_checked(x, (), eps, fro_sumsq=fro_sumsq, out=out,
                                row_sumsq_out=row_sumsq_out, workspace=None, config=None,
                                props=props, overwrite_input=False)
    ws = workspace or GramNSWorkspace()
    tall = m > n
    d = min(m, n)
    cfg = config or default_gram_ns_config(batch, m, n, props, x.element_size())
    segments = gram_segments(len(schedule), restarts)
    launches: list = []

    if fro_sumsq is None:
        fro = _buffer(ws.fro, (batch,), torch.float32, dev, "fro")
        parts = _partials(ws, fro_sumsq_partial_size(batch, m, n, props), dev)
        launches += prepare_fro_sumsq(x3, fro, partials=parts, props=props)
    else:
        fro = fro_sumsq.reshape(batch)

    r, z, qa, qb = (_buffer(getattr(ws, k), (batch, d, d), torch.bfloat16, dev, k)
                    for k in ("r", "z", "qa", "qb"))
    spare = _buffer(ws.x, (batch, m, n), torch.bfloat16, dev, "x") if len(segments) > 1 else None
    for buf in (spare, r, z, qa, qb):
        if buf is not None and (_shares_storage(buf, x3) or _shares_storage(buf, out3)):
            raise ValueError("workspace buffers must not share memory with the input or out")
    row_parts = _partials(ws, row_partial_size(batch, m, n, cfg.apply), dev) if rsq is not None else None

    cur, step, last_seg = x3, 0, len(segments) - 1
    for k, length in enumerate(segments):
        s = fro if k == 0 else None
        gram_cfg, apply_cfg = cfg.gram, cfg.apply
        if k == 0 and cur.element_size() >= 4:
            gram_cfg, apply_cfg = cfg.first_gram or cfg.gram, cfg.first_apply or cfg.apply
        launches += prepare_sym_gram(cur, r, transposed=tall, fro_sumsq=s, eps=eps,
                                     config=gram_cfg, props=props)
        q, q_spare = qa, qb
        for j in range(length):
            a, b, c = schedule[step]
            launches += prepare_sym_gram(r, z, alpha=c, bias=r, beta=b, config=cfg.poly, props=props)
            if j == 0:
                launches += prepare_add_identity(z, q, a, props=props)
            else:  # Q <- a Q + Z Q
                launches += prepare_ns_apply(z, q, q, q_spare, alpha=a, config=cfg.square, props=props)
                q, q_spare = q_spare, q
            if j < length - 1:  # R <- P R P: T = a R + R Z (in Q's spare), R = a T + Z T
                t = q_spare
                launches += prepare_ns_apply(r, z, r, t, alpha=a, config=cfg.square, props=props)
                launches += prepare_ns_apply(z, t, t, r, alpha=a, config=cfg.square, props=props)
                launches += prepare_mirror_upper(r, props=props)
            step += 1
        # X <- Q X, ping-pong between the spare and ``out`` so that the last segment lands in out.
        dst = out3 if (last_seg - k) % 2 == 0 else spare
        left, right = (cur, q.mT) if tall else (q, cur)
        launches += prepare_ns_apply(
            left, right, cur, dst, alpha=0.0, fro_sumsq=s, eps=eps,
            row_sumsq_out=rsq if k == last_seg else None,
            row_partials=row_parts if k == last_seg else None, config=apply_cfg, props=props)
        cur = dst
    return Prepared(launches, out)


gram_newton_schulz = public_op(prepare_gram_newton_schulz, "gram_newton_schulz")
