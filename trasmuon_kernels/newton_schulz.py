"""Batched bf16 Newton–Schulz orthogonalization in Triton (SPEC step 3; docs/kernels-newton-schulz.md).

Semantics are those of :func:`trasmuon.reference.newton_schulz`: X = bf16(M), transposed
when m > n; X <- X / (||X||_F + eps); per (a, b, c): A = X X^T, B = b*A + c*A A,
X = a*X + B X; the result is bf16 in the shape of M. Each step is three launches for the
whole stack of same-shape matrices:

1. ``gram.sym_gram``: A = X X^T (X^T X read straight from a tall matrix), upper-triangle
   tiles only, mirrored; on the first step the Frobenius normalization is folded in
   (A = s^2 X0 X0^T, s = 1 / (sqrt(fro_sumsq) + eps)).
2. ``gram.sym_gram``: B = c * A A + b * A, upper tiles only, b*A fused into the epilogue.
3. ``ns_apply.ns_apply``: X <- a*X + B X (tall: P <- a*P + P B on the stored layout), a*X
   fused into the epilogue; on the first step the result is scaled by s (so the normalized
   input is never materialized); on the last step it is written straight into ``out`` and
   can also reduce the row sums of squares of O (``row_sumsq_out=``, SPEC step 4).

plus, when ``fro_sumsq`` is not given, one small reduction (``fro_sumsq.fro_sumsq``).

Host behaviour: no ``.item()``, no Python branching on device values; every allocation
depends on shapes only, and all of them can be passed in preallocated (``out=``,
``workspace=``), so a call can be captured in a CUDA graph (with ``autotune`` off, or after
the tuned config is cached). Tile configs come from per-shape heuristics; autotuning is
opt-in (``autotune=True`` or ``TRASMUON_NS_AUTOTUNE=1``), runs once per shape on the first
call that asks for it and is cached for the process; it never runs unless asked.

torch.compile: under ``torch.compile`` the launcher calls the custom op
``torch.ops.trasmuon_kernels.newton_schulz_out`` (``torch.library.custom_op``, mutating
``out`` and ``row_sumsq_out``), which the compiler treats as one opaque call (no graph
break, no fusion across it; heuristic or already-tuned configs, no ``workspace``). In eager
mode the launcher runs the kernels directly (no dispatcher overhead).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton

from trasmuon.reference import TRASMUON_NS_COEFFICIENTS, NSTriple, is_ns_triple, ns_schedule

from ._common import check_device
from .fro_sumsq import fro_sumsq as _fro_sumsq
from .fro_sumsq import fro_sumsq_partial_size
from .gram import GramConfig, default_gram_config, gram_candidates, sym_gram
from .ns_apply import (
    ApplyConfig,
    apply_candidates,
    default_apply_config,
    ns_apply,
    row_partial_tiles,
)

__all__ = [
    "DEFAULT_STEPS",
    "NSConfig",
    "NSWorkspace",
    "clear_tuned_configs",
    "default_config",
    "newton_schulz",
    "newton_schulz_workspace",
    "tuned_configs",
]

# Steps used when ``coefficients`` is a single triple and ``steps`` is not given (SPEC
# default ns_steps).
DEFAULT_STEPS = 5
AUTOTUNE_ENV = "TRASMUON_NS_AUTOTUNE"


@dataclass(frozen=True)
class NSConfig:
    """Tile configs of the three products: the Gram matrix X X^T (inner size max(m, n)),
    the polynomial A A (inner size min(m, n)) and the update B X."""

    gram: GramConfig
    poly: GramConfig
    apply: ApplyConfig


@dataclass
class NSWorkspace:
    """Preallocated buffers for :func:`newton_schulz` (any of them may be None: allocated
    per call). Shapes for a stack of B matrices of shape (m, n), d = min(m, n):

    x: (B, m, n) bf16, the ping-pong iterate (needed for 2 or more steps);
    gram, poly: (B, d, d) bf16; fro: (B,) fp32 (the sum of squares, when ``fro_sumsq`` is not
    given); partials: contiguous fp32, the partial sums of the reductions (sized by
    :func:`newton_schulz_workspace`; a call with a config that needs more allocates its own).
    """

    x: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    poly: torch.Tensor | None = None
    fro: torch.Tensor | None = None
    partials: torch.Tensor | None = None


def default_config(batch: int, m: int, n: int, device: torch.device | str) -> NSConfig:
    """The heuristic tile configs for a stack of ``batch`` (m, n) matrices (see the kernel
    modules' ``default_*_config``)."""
    device = torch.device(device)
    d, k = min(m, n), max(m, n)
    return NSConfig(
        gram=default_gram_config(batch, d, k, device),
        poly=default_gram_config(batch, d, d, device),
        apply=default_apply_config(batch, m, n, d, device),
    )


def newton_schulz_workspace(
    shape: Sequence[int],
    device: torch.device | str,
    *,
    steps: int = DEFAULT_STEPS,
    config: NSConfig | None = None,
) -> NSWorkspace:
    """Allocate every buffer a call on a tensor of ``shape`` (``(..., m, n)``) needs, so that
    repeated calls (and CUDA graph replays) allocate nothing."""
    device = torch.device(device)
    *lead, m, n = shape
    batch = math.prod(lead)
    d = min(m, n)
    cfg = config or default_config(batch, m, n, device)
    row_parts = batch * row_partial_tiles(n, cfg.apply) * m
    fro_parts = fro_sumsq_partial_size(batch, m, n, device)
    return NSWorkspace(
        x=torch.empty(batch, m, n, device=device, dtype=torch.bfloat16) if steps >= 2 else None,
        gram=torch.empty(batch, d, d, device=device, dtype=torch.bfloat16),
        poly=torch.empty(batch, d, d, device=device, dtype=torch.bfloat16),
        fro=torch.empty(batch, device=device, dtype=torch.float32),
        partials=torch.empty(max(row_parts, fro_parts, 1), device=device, dtype=torch.float32),
    )


# --------------------------------------------------------------------------------------
# Opt-in autotuning
# --------------------------------------------------------------------------------------
_TUNED: dict[tuple, NSConfig] = {}


def tuned_configs() -> dict[tuple, NSConfig]:
    """A copy of the configs the autotuner has chosen so far, by shape key."""
    return dict(_TUNED)


def clear_tuned_configs() -> None:
    _TUNED.clear()


def _autotune_requested(autotune: bool | None) -> bool:
    if autotune is not None:
        return bool(autotune)
    return os.environ.get(AUTOTUNE_ENV, "0").lower() not in ("", "0", "false", "no")


def _tune_key(x3: torch.Tensor) -> tuple:
    dev = x3.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "interpreter"
    return (tuple(x3.shape), x3.dtype, name)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    start = time.perf_counter()  # interpreter: one run, only to exercise the tuner
    fn()
    return time.perf_counter() - start


def _fastest(candidates: list, run: Callable, device: torch.device):
    best, best_t = None, float("inf")
    for cfg in candidates:
        try:
            t = _time(lambda cfg=cfg: run(cfg), device)
        except Exception:  # e.g. out of shared memory for this tile shape on this GPU
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError("newton_schulz autotuning: no candidate config ran")
    return best


def _tune(x3, tall, fro, eps, gram, poly, dst) -> NSConfig:
    dev = x3.device
    _, m, n = x3.shape
    d, k = min(m, n), max(m, n)
    g = _fastest(
        gram_candidates(d, k, dev),
        lambda c: sym_gram(x3, gram, transposed=tall, fro_sumsq=fro, eps=eps, config=c),
        dev,
    )
    p = _fastest(
        gram_candidates(d, d, dev),
        lambda c: sym_gram(gram, poly, alpha=1.0, bias=gram, beta=0.0, config=c),
        dev,
    )
    if tall:
        run = lambda c: ns_apply(x3, poly, x3, dst, alpha=1.0, fro_sumsq=fro, eps=eps, config=c)
    else:
        run = lambda c: ns_apply(poly, x3, x3, dst, alpha=1.0, fro_sumsq=fro, eps=eps, config=c)
    a = _fastest(apply_candidates(m, n, d, dev), run, dev)
    return NSConfig(gram=g, poly=p, apply=a)


# --------------------------------------------------------------------------------------
# The iteration
# --------------------------------------------------------------------------------------
def _buffer(buf, shape, dtype, device, what):
    if buf is None:
        return torch.empty(shape, device=device, dtype=dtype)
    if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != device:
        raise ValueError(f"workspace.{what} must be {dtype} {tuple(shape)} on {device}")
    return buf


def _partials(ws: NSWorkspace, need: int, device) -> torch.Tensor | None:
    if need == 0:
        return None
    p = ws.partials
    if (
        p is not None
        and p.dtype == torch.float32
        and p.is_contiguous()
        and p.numel() >= need
        and p.device == device
    ):
        return p
    return torch.empty(need, device=device, dtype=torch.float32)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _newton_schulz_impl(
    x: torch.Tensor,
    schedule: Sequence[NSTriple],
    eps: float,
    fro_sumsq: torch.Tensor | None,
    out: torch.Tensor,
    row_sumsq_out: torch.Tensor | None,
    workspace: NSWorkspace | None,
    config: NSConfig | None,
    autotune: bool,
) -> None:
    m, n = x.shape[-2:]
    batch = math.prod(x.shape[:-2])
    dev = x.device
    x3 = x.reshape(batch, m, n)  # a view for any (B, m, n) layout; copies only odd >3D views
    out3 = out.view(batch, m, n)
    rsq = row_sumsq_out.view(batch, m) if row_sumsq_out is not None else None
    if batch == 0 or m == 0 or n == 0:
        if rsq is not None:
            rsq.zero_()
        return
    ws = workspace or NSWorkspace()
    tall = m > n
    d = min(m, n)
    steps = len(schedule)

    if fro_sumsq is None:
        fro = _buffer(ws.fro, (batch,), torch.float32, dev, "fro")
        _fro_sumsq(x3, fro, partials=_partials(ws, fro_sumsq_partial_size(batch, m, n, dev), dev))
    else:
        fro = fro_sumsq.reshape(batch)

    if steps == 0:  # O = bf16(X / (||X|| + eps)): the update kernel with an empty product
        cfg_apply = (
            config.apply if config is not None else default_apply_config(batch, m, n, 0, dev)
        )
        ns_apply(
            x3[:, :, :0],
            x3[:, :0, :],
            x3,
            out3,
            alpha=1.0,
            fro_sumsq=fro,
            eps=eps,
            row_sumsq_out=rsq,
            row_partials=_partials(ws, batch * row_partial_tiles(n, cfg_apply) * m, dev),
            config=cfg_apply,
        )
        return

    gram = _buffer(ws.gram, (batch, d, d), torch.bfloat16, dev, "gram")
    poly = _buffer(ws.poly, (batch, d, d), torch.bfloat16, dev, "poly")
    spare = _buffer(ws.x, (batch, m, n), torch.bfloat16, dev, "x") if steps >= 2 else None
    for buf in (spare, gram, poly):
        if buf is not None and (_shares_storage(buf, x3) or _shares_storage(buf, out3)):
            raise ValueError("workspace buffers must not share memory with the input or out")

    cfg = config
    if cfg is None and autotune:
        key = _tune_key(x3)
        cfg = _TUNED.get(key)
        if cfg is None:
            if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
                warnings.warn(
                    "newton_schulz: autotuning cannot run during CUDA graph capture; using the "
                    "heuristic config (tune with one eager call before capturing)",
                    stacklevel=3,
                )
            else:
                cfg = _TUNED[key] = _tune(x3, tall, fro, eps, gram, poly, out3)
    if cfg is None:
        cfg = default_config(batch, m, n, dev)
    row_parts = (
        _partials(ws, batch * row_partial_tiles(n, cfg.apply) * m, dev) if rsq is not None else None
    )

    cur = x3
    for t, (a, b, c) in enumerate(schedule):
        first, last = t == 0, t == steps - 1
        # Ping-pong so that the last step lands in ``out``.
        dst = out3 if (steps - 1 - t) % 2 == 0 else spare
        s = fro if first else None
        sym_gram(cur, gram, transposed=tall, fro_sumsq=s, eps=eps, config=cfg.gram)
        sym_gram(gram, poly, alpha=c, bias=gram, beta=b, config=cfg.poly)
        left, right = (cur, poly) if tall else (poly, cur)
        ns_apply(
            left,
            right,
            cur,
            dst,
            alpha=a,
            fro_sumsq=s,
            eps=eps,
            row_sumsq_out=rsq if last else None,
            row_partials=row_parts if last else None,
            config=cfg.apply,
        )
        cur = dst


# --------------------------------------------------------------------------------------
# torch.compile: an opaque custom op
# --------------------------------------------------------------------------------------
@torch.library.custom_op(
    "trasmuon_kernels::newton_schulz_out",
    mutates_args=("out", "row_sumsq_out"),
    schema=(
        "(Tensor x, float[] coefficients, float eps, Tensor? fro_sumsq, Tensor(a!) out, "
        "Tensor(b!)? row_sumsq_out) -> ()"
    ),
)
def _newton_schulz_out_op(x, coefficients, eps, fro_sumsq, out, row_sumsq_out):
    schedule = [tuple(coefficients[i : i + 3]) for i in range(0, len(coefficients), 3)]
    _newton_schulz_impl(
        x, schedule, eps, fro_sumsq, out, row_sumsq_out, None, None, _autotune_requested(None)
    )


@_newton_schulz_out_op.register_fake
def _(x, coefficients, eps, fro_sumsq, out, row_sumsq_out):
    return None


# --------------------------------------------------------------------------------------
# Public launcher
# --------------------------------------------------------------------------------------
def _resolve_schedule(coefficients, steps: int | None) -> tuple[NSTriple, ...]:
    if steps is None:
        steps = DEFAULT_STEPS if is_ns_triple(coefficients) else len(tuple(coefficients))
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return ns_schedule(coefficients, steps)


def newton_schulz(
    x: torch.Tensor,
    coefficients: NSTriple | Sequence[NSTriple] = TRASMUON_NS_COEFFICIENTS,
    eps: float = 1e-8,
    *,
    steps: int | None = None,
    fro_sumsq: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    row_sumsq_out: torch.Tensor | None = None,
    workspace: NSWorkspace | None = None,
    config: NSConfig | None = None,
    autotune: bool | None = None,
) -> torch.Tensor:
    """Orthogonalize ``x`` (``(m, n)`` or a stack ``(..., m, n)``) by Newton–Schulz in bf16.

    Same result as ``trasmuon.reference.newton_schulz(x, ns_schedule(coefficients, steps),
    eps)`` up to fp32 summation order (each product accumulates in fp32 and rounds once to
    bf16, round to nearest even).

    coefficients: one (a, b, c) triple or a schedule of them (default: the TrasMuon
        schedule); resolved with ``reference.ns_schedule`` (a short schedule repeats its last
        triple, a long one is cut).
    eps: added to ||X||_F before dividing.
    steps: number of iterations; None means the schedule's length, or 5 for a single triple.
        0 returns the normalized bf16 input.
    fro_sumsq: optional (B,) (or ``x.shape[:-2]``) fp32 sums of squares ||bf16(x_b)||_F^2,
        e.g. from the momentum pass; computed with a small reduction when not given.
    out: optional bf16 output of ``x``'s shape (must not share memory with ``x``).
    row_sumsq_out: optional fp32 ``x.shape[:-1]`` output receiving sum_j O_ij^2 of the
        returned bf16 O, reduced in the last product's epilogue (deterministic).
    workspace: optional :class:`NSWorkspace` (see :func:`newton_schulz_workspace`).
    config: explicit :class:`NSConfig` (default: per-shape heuristics).
    autotune: time candidate configs once per (shape, dtype, GPU) and cache the winner
        (default: the ``TRASMUON_NS_AUTOTUNE`` environment variable, off).
    Returns ``out`` (bf16, shape of ``x``).
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a stack, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"newton_schulz needs a floating-point input, got {x.dtype}")
    schedule = _resolve_schedule(coefficients, steps)
    m = x.shape[-2]
    batch_shape = tuple(x.shape[:-2])
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=torch.bfloat16)
    elif out.shape != x.shape or out.dtype != torch.bfloat16 or out.device != x.device:
        raise ValueError(f"out must be a bf16 tensor of shape {tuple(x.shape)} on {x.device}")
    if fro_sumsq is not None and (
        fro_sumsq.dtype != torch.float32
        or fro_sumsq.numel() != math.prod(batch_shape)
        or fro_sumsq.device != x.device
    ):
        raise ValueError(
            f"fro_sumsq must be a float32 tensor of shape {batch_shape or (1,)} on {x.device}"
        )
    if row_sumsq_out is not None and (
        row_sumsq_out.shape != (*batch_shape, m)
        or row_sumsq_out.dtype != torch.float32
        or row_sumsq_out.device != x.device
    ):
        raise ValueError(
            f"row_sumsq_out must be a float32 tensor of shape {(*batch_shape, m)} on {x.device}"
        )

    if torch.compiler.is_compiling():
        flat = [float(v) for triple in schedule for v in triple]
        torch.ops.trasmuon_kernels.newton_schulz_out(
            x, flat, float(eps), fro_sumsq, out, row_sumsq_out
        )
        return out

    check_device("x", x)
    if _shares_storage(out, x):
        raise ValueError("out must not share memory with x")
    _newton_schulz_impl(
        x,
        schedule,
        float(eps),
        fro_sumsq,
        out,
        row_sumsq_out,
        workspace,
        config,
        _autotune_requested(autotune),
    )
    return out
