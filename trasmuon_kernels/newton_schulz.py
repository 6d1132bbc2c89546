"""Batched bf16 Newton–Schulz orthogonalization in Triton (docs/rule.md, step 3;
docs/kernels-newton-schulz.md).

Semantics are those of the eager reference ``trasmuon.reference.newton_schulz`` for an
explicit schedule of (a, b, c) triples: X = bf16(M), transposed when m > n;
X <- X / (||X||_F + eps); per (a, b, c): A = X X^T, B = b*A + c*A A, X = a*X + B X; the
result is bf16 in the shape of M. (Resolving a coefficient table and a step count into a
schedule is the caller's job: ``trasmuon.reference.ns_schedule``.) Each step is three
launches for the whole stack of same-shape matrices:

1. ``gram.sym_gram``: A = X X^T (X^T X read straight from a tall matrix), upper-triangle
   tiles only, mirrored; on the first step the Frobenius normalization is folded in
   (A = s^2 X0 X0^T, s = 1 / (sqrt(fro_sumsq) + eps)).
2. ``gram.sym_gram``: B = c * A A + b * A, upper tiles only, b*A fused into the epilogue.
3. ``ns_apply.ns_apply``: X <- a*X + B X (tall: P <- a*P + P B on the stored layout), a*X
   fused into the epilogue; on the first step the result is scaled by s (so the normalized
   input is never materialized); on the last step it is written straight into ``out`` and
   can also reduce the row sums of squares of O (``row_sumsq_out=``, docs/rule.md, step 4).

plus, when ``fro_sumsq`` is not given, one small reduction (``fro_sumsq.fro_sumsq``), which
scales a matrix whose sum of squares overflows float32 in place by a power of two.

Prepared launches. ``prepare_newton_schulz`` returns the whole list (checks, configs,
buffers and every argument computed once); ``newton_schulz`` prepares and runs it. A caller
that runs the same NS every step prepares once and replays the list: nothing is allocated or
recomputed on replay. Buffers: the input, ``out``, two (B, d, d) Gram buffers, a (B,) norm
and a small partial-sum buffer, plus one (B, m, n) ping-pong spare for 2 or more steps; with
``overwrite_input=True`` and an odd number of steps the input itself is the spare (it is
read only by the first step), so no spare is needed.

Host behaviour: no ``.item()``, no Python branching on device values; every allocation
depends on shapes only, and all of them can be passed in preallocated (``out=``,
``workspace=``), so a call can be captured in a CUDA graph (with ``autotune`` off, or after
the tuned config is cached). Tile configs come from per-shape heuristics (pure functions of
the shapes and a ``DeviceProps``); autotuning is opt-in (``autotune=True`` or
``TRASMUON_NS_AUTOTUNE=1``), runs once per shape on the first call that asks for it and is
cached for the process; it never runs unless asked.

torch.compile: under ``torch.compile`` the launcher calls the custom op
``torch.ops.trasmuon_kernels.newton_schulz_out`` (``torch.library.custom_op``, mutating
``out`` and ``row_sumsq_out``), which the compiler treats as one opaque call (no graph
break, no fusion across it; heuristic or already-tuned configs, no ``workspace``). In eager
mode the launcher runs the kernels directly (no dispatcher overhead).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton

from ._common import check_device, props_for
from ._launch import DeviceProps, Prepared, TorchLaunch, device_props, run_all
from .fro_sumsq import fro_sumsq_partial_size, prepare_fro_sumsq
from .gram import GramConfig, default_gram_config, gram_candidates, prepare_sym_gram, sym_gram
from .ns_apply import (
    ApplyConfig,
    apply_candidates,
    default_apply_config,
    ns_apply,
    prepare_ns_apply,
    row_partial_size,
)

__all__ = [
    "NSConfig",
    "NSTriple",
    "NSWorkspace",
    "clear_tuned_configs",
    "default_config",
    "newton_schulz",
    "newton_schulz_workspace",
    "prepare_newton_schulz",
    "tuned_configs",
]

NSTriple = tuple[float, float, float]
AUTOTUNE_ENV = "TRASMUON_NS_AUTOTUNE"


@dataclass(frozen=True)
class NSConfig:
    """Tile configs of the three products: the Gram matrix X X^T (inner size max(m, n)),
    the polynomial A A (inner size min(m, n)) and the update B X."""

    gram: GramConfig
    poly: GramConfig
    apply: ApplyConfig
    # The first step's Gram and update when they read a 4-byte input (the fp32 momentum),
    # where they differ: half the BLOCK_K, so that a stage's fp32 tiles take the shared
    # memory (and registers) of bf16 ones. None: the same as ``gram`` / ``apply``.
    first_gram: GramConfig | None = None
    first_apply: ApplyConfig | None = None


@dataclass
class NSWorkspace:
    """Preallocated buffers for :func:`newton_schulz` (any of them may be None: allocated
    by the prepare call). Shapes for a stack of B matrices of shape (m, n), d = min(m, n):

    x: (B, m, n) bf16, the ping-pong spare (needed for 2 or more steps, unless the input
    serves as the spare: ``overwrite_input`` with an odd number of steps);
    gram, poly: (B, d, d) bf16; fro: (B,) fp32 (the sum of squares, when ``fro_sumsq`` is not
    given); partials: contiguous fp32, the partial sums of the reductions (sized by
    :func:`newton_schulz_workspace`; a call with a config that needs more allocates its own).
    """

    x: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    poly: torch.Tensor | None = None
    fro: torch.Tensor | None = None
    partials: torch.Tensor | None = None


def check_schedule(schedule: Sequence[Sequence[float]]) -> tuple[NSTriple, ...]:
    """``schedule`` as a tuple of float (a, b, c) triples, one per step (empty: 0 steps)."""
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
        raise TypeError(f"schedule must be a sequence of (a, b, c) triples, got {type(schedule).__name__}")
    triples = []
    for i, triple in enumerate(schedule):
        if (
            isinstance(triple, (str, bytes))
            or not isinstance(triple, Sequence)
            or len(triple) != 3
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in triple)
        ):
            raise TypeError(
                f"schedule[{i}] must be an (a, b, c) triple of numbers, got {triple!r} "
                "(resolve coefficients and a step count with trasmuon.reference.ns_schedule)"
            )
        triples.append(tuple(float(v) for v in triple))
    return tuple(triples)


def default_config(batch: int, m: int, n: int, props: DeviceProps, input_itemsize: int = 2) -> NSConfig:
    """The heuristic tile configs for a stack of ``batch`` (m, n) matrices on a device with
    ``props`` (see the kernel modules' ``default_*_config``), whose input has elements of
    ``input_itemsize`` bytes (the first step reads it; the later steps read bf16)."""
    d, k = min(m, n), max(m, n)
    gram = default_gram_config(batch, d, k, props)
    apply = default_apply_config(batch, m, n, d, props)
    first_gram = first_apply = None
    if props.is_cuda and input_itemsize >= 4:
        # fp32 tiles at BLOCK_K 64 took 144 KiB of shared memory and spilled (one block
        # per SM on sm_90); at 32 they take what bf16 tiles take at 64. The update also
        # reads its fp32 addend in the epilogue: with a 128x128 tile that spilled even at
        # BLOCK_K 32, so its tile is 128x64 there.
        if gram.block_k > 32:
            first_gram = dataclasses.replace(gram, block_k=32)
        if apply.block_k > 32 or apply.block_n > 64:
            first_apply = dataclasses.replace(apply, block_k=min(apply.block_k, 32),
                                              block_n=min(apply.block_n, 64))
    return NSConfig(gram=gram, poly=default_gram_config(batch, d, d, props), apply=apply,
                    first_gram=first_gram, first_apply=first_apply)


def newton_schulz_workspace(
    shape: Sequence[int],
    device: torch.device | str,
    *,
    steps: int,
    config: NSConfig | None = None,
    props: DeviceProps | None = None,
    overwrite_input: bool = False,
) -> NSWorkspace:
    """Allocate every buffer a call on a tensor of ``shape`` (``(..., m, n)``) needs, so that
    repeated calls (and CUDA graph replays) allocate nothing. ``overwrite_input``: the call
    will pass ``overwrite_input=True`` (no spare for an odd number of steps)."""
    device = torch.device(device)
    props = props if props is not None else device_props(device)
    *lead, m, n = shape
    batch = math.prod(lead)
    d = min(m, n)
    cfg = config or default_config(batch, m, n, props)
    row_parts = row_partial_size(batch, m, n, cfg.apply)
    fro_parts = fro_sumsq_partial_size(batch, m, n, props)
    needs_spare = steps >= 2 and not (overwrite_input and steps % 2 == 1)
    return NSWorkspace(
        x=torch.empty(batch, m, n, device=device, dtype=torch.bfloat16) if needs_spare else None,
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


def _tune(x3: torch.Tensor, fro: torch.Tensor, eps: float, props: DeviceProps) -> NSConfig:
    """Time the candidate configs of each product on scratch buffers; the fastest of each."""
    dev = x3.device
    _, m, n = x3.shape
    tall = m > n
    d, k = min(m, n), max(m, n)
    gram = torch.empty(x3.shape[0], d, d, device=dev, dtype=torch.bfloat16)
    poly = torch.empty_like(gram)
    dst = torch.empty(x3.shape, device=dev, dtype=torch.bfloat16)
    g = _fastest(
        gram_candidates(d, k, props),
        lambda c: sym_gram(x3, gram, transposed=tall, fro_sumsq=fro, eps=eps, config=c, props=props),
        dev,
    )
    p = _fastest(
        gram_candidates(d, d, props),
        lambda c: sym_gram(gram, poly, alpha=1.0, bias=gram, beta=0.0, config=c, props=props),
        dev,
    )
    left, right = (x3, poly) if tall else (poly, x3)
    a = _fastest(
        apply_candidates(m, n, d, props),
        lambda c: ns_apply(left, right, x3, dst, alpha=1.0, fro_sumsq=fro, eps=eps, config=c, props=props),
        dev,
    )
    return NSConfig(gram=g, poly=p, apply=a)


def _tuned_config(
    x: torch.Tensor, eps: float, fro_sumsq: torch.Tensor | None, props: DeviceProps
) -> NSConfig | None:
    """The cached tuned config of ``x``'s shape, tuned now when missing (None during CUDA
    graph capture, where nothing can be timed)."""
    m, n = x.shape[-2:]
    x3 = x.reshape(-1, m, n)
    key = _tune_key(x3)
    cfg = _TUNED.get(key)
    if cfg is not None or x3.shape[0] == 0 or m == 0 or n == 0:
        return cfg
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        warnings.warn(
            "newton_schulz: autotuning cannot run during CUDA graph capture; using the "
            "heuristic config (tune with one eager call before capturing)",
            stacklevel=3,
        )
        return None
    if fro_sumsq is None:
        fro = torch.empty(x3.shape[0], device=x.device, dtype=torch.float32)
        run_all(prepare_fro_sumsq(x3, fro, props=props))
    else:
        fro = fro_sumsq.reshape(-1)
    cfg = _TUNED[key] = _tune(x3, fro, eps, props)
    return cfg


# --------------------------------------------------------------------------------------
# The iteration, as a list of launches
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
    if a.numel() == 0 or b.numel() == 0:  # nothing to overlap (and empty storages share address 0)
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _checked_out(
    x: torch.Tensor,
    fro_sumsq: torch.Tensor | None,
    out: torch.Tensor | None,
    row_sumsq_out: torch.Tensor | None,
) -> torch.Tensor:
    """Argument checks shared by the eager and the compiled path; returns ``out`` (new when
    None)."""
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a stack, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"newton_schulz needs a floating-point input, got {x.dtype}")
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
    return out


def prepare_newton_schulz(
    x: torch.Tensor,
    schedule: Sequence[NSTriple],
    eps: float,
    *,
    fro_sumsq: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    row_sumsq_out: torch.Tensor | None = None,
    workspace: NSWorkspace | None = None,
    config: NSConfig | None = None,
    props: DeviceProps | None = None,
    overwrite_input: bool = False,
) -> Prepared:
    """Every launch of :func:`newton_schulz` (same arguments), in order; ``result`` is ``out``.

    Buffers missing from ``workspace`` (and ``out``) are allocated here, once: replaying the
    list allocates nothing. ``overwrite_input``: with an odd number of steps (3 or more), the
    bf16 input is overwritten by the iteration (it is its ping-pong spare), so the launches
    touch only ``x``, ``out``, the Gram buffers and the small reduction buffers.
    ``props``: the device the configs are chosen for (default: ``x``'s).
    """
    schedule = check_schedule(schedule)
    out = _checked_out(x, fro_sumsq, out, row_sumsq_out)
    check_device("x", x, props)
    return _prepare_checked(
        x, schedule, eps, fro_sumsq=fro_sumsq, out=out, row_sumsq_out=row_sumsq_out,
        workspace=workspace, config=config, props=props, overwrite_input=overwrite_input,
    )


def _prepare_checked(
    x: torch.Tensor,
    schedule: tuple[NSTriple, ...],
    eps: float,
    *,
    fro_sumsq: torch.Tensor | None,
    out: torch.Tensor,
    row_sumsq_out: torch.Tensor | None,
    workspace: NSWorkspace | None,
    config: NSConfig | None,
    props: DeviceProps | None,
    overwrite_input: bool,
) -> Prepared:
    """:func:`prepare_newton_schulz` after its first checks (``check_schedule``,
    ``_checked_out``, ``check_device``), which the caller has run: ``schedule`` and ``out`` are
    their results."""
    if _shares_storage(out, x):
        raise ValueError("out must not share memory with x")
    props = props_for(x, props)
    m, n = x.shape[-2:]
    batch = math.prod(x.shape[:-2])
    dev = x.device
    x3 = x.reshape(batch, m, n)  # a view for any (B, m, n) layout; copies only odd >3D views
    out3 = out.view(batch, m, n)
    rsq = row_sumsq_out.view(batch, m) if row_sumsq_out is not None else None
    if batch == 0 or m == 0 or n == 0:
        if rsq is None:
            return Prepared([], out)
        return Prepared([TorchLaunch("zero_row_sumsq", rsq.zero_, (rsq,))], out)
    ws = workspace or NSWorkspace()
    tall = m > n
    d = min(m, n)
    steps = len(schedule)
    cfg = config or default_config(batch, m, n, props, x.element_size())
    launches: list = []

    if fro_sumsq is None:
        fro = _buffer(ws.fro, (batch,), torch.float32, dev, "fro")
        parts = _partials(ws, fro_sumsq_partial_size(batch, m, n, props), dev)
        launches += prepare_fro_sumsq(x3, fro, partials=parts, props=props)
    else:
        fro = fro_sumsq.reshape(batch)

    if steps == 0:  # O = bf16(X / (||X|| + eps)): the update kernel with an empty product
        cfg_apply = config.apply if config is not None else default_apply_config(batch, m, n, 0, props)
        launches += prepare_ns_apply(
            x3[:, :, :0], x3[:, :0, :], x3, out3, alpha=1.0, fro_sumsq=fro, eps=eps,
            row_sumsq_out=rsq,
            row_partials=_partials(ws, row_partial_size(batch, m, n, cfg_apply), dev),
            config=cfg_apply, props=props,
        )
        return Prepared(launches, out)

    gram = _buffer(ws.gram, (batch, d, d), torch.bfloat16, dev, "gram")
    poly = _buffer(ws.poly, (batch, d, d), torch.bfloat16, dev, "poly")
    spare = None
    if steps >= 2:
        if overwrite_input and steps % 2 == 1:
            if x3.dtype != torch.bfloat16:
                raise ValueError(
                    f"overwrite_input needs a bf16 input (it becomes the iterate), got {x.dtype}"
                )
            spare = x3  # read by step 1 only; first written by step 2
        else:
            spare = _buffer(ws.x, (batch, m, n), torch.bfloat16, dev, "x")
    for buf in (spare, gram, poly):
        if buf is not None and buf is not x3 and (_shares_storage(buf, x3) or _shares_storage(buf, out3)):
            raise ValueError("workspace buffers must not share memory with the input or out")
    row_parts = _partials(ws, row_partial_size(batch, m, n, cfg.apply), dev) if rsq is not None else None

    cur = x3
    for t, (a, b, c) in enumerate(schedule):
        first, last = t == 0, t == steps - 1
        # Ping-pong so that the last step lands in ``out``.
        dst = out3 if (steps - 1 - t) % 2 == 0 else spare
        s = fro if first else None
        gram_cfg, apply_cfg = cfg.gram, cfg.apply
        if first and cur.element_size() >= 4:
            gram_cfg, apply_cfg = cfg.first_gram or cfg.gram, cfg.first_apply or cfg.apply
        launches += prepare_sym_gram(
            cur, gram, transposed=tall, fro_sumsq=s, eps=eps, config=gram_cfg, props=props
        )
        launches += prepare_sym_gram(
            gram, poly, alpha=c, bias=gram, beta=b, config=cfg.poly, props=props
        )
        left, right = (cur, poly) if tall else (poly, cur)
        launches += prepare_ns_apply(
            left, right, cur, dst, alpha=a, fro_sumsq=s, eps=eps,
            row_sumsq_out=rsq if last else None,
            row_partials=row_parts if last else None,
            config=apply_cfg, props=props,
        )
        cur = dst
    return Prepared(launches, out)


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
    props = device_props(x.device)
    config = _tuned_config(x, eps, fro_sumsq, props) if _autotune_requested(None) else None
    run_all(prepare_newton_schulz(
        x, schedule, eps, fro_sumsq=fro_sumsq, out=out, row_sumsq_out=row_sumsq_out,
        config=config, props=props,
    ))


@_newton_schulz_out_op.register_fake
def _(x, coefficients, eps, fro_sumsq, out, row_sumsq_out):
    return None


# --------------------------------------------------------------------------------------
# Public launcher (hand-written, not ``public_op``: it also autotunes on request and goes
# through the torch.library op under torch.compile)
# --------------------------------------------------------------------------------------
def newton_schulz(
    x: torch.Tensor,
    schedule: Sequence[NSTriple],
    eps: float,
    *,
    fro_sumsq: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    row_sumsq_out: torch.Tensor | None = None,
    workspace: NSWorkspace | None = None,
    config: NSConfig | None = None,
    autotune: bool | None = None,
    props: DeviceProps | None = None,
    overwrite_input: bool = False,
) -> torch.Tensor:
    """Orthogonalize ``x`` (``(m, n)`` or a stack ``(..., m, n)``) by Newton–Schulz in bf16.

    Same result as ``trasmuon.reference.newton_schulz(x, schedule, eps)`` up to fp32
    summation order (each product accumulates in fp32 and rounds once to bf16, round to
    nearest even).

    schedule: the (a, b, c) triple of each step, in order (``len(schedule)`` steps; empty:
        the normalized bf16 input). ``reference.ns_schedule(coefficients, steps)`` builds it.
    eps: added to ||X||_F before dividing.
    fro_sumsq: optional (B,) (or ``x.shape[:-2]``) fp32 sums of squares ||bf16(x_b)||_F^2,
        e.g. from the momentum pass; computed with a small reduction when not given. It must
        be finite: where the sum overflows, that reduction (like the momentum pass) first
        scales ``x_b`` in place by a power of two (same O; docs/usage.md, "Huge gradients").
    out: optional bf16 output of ``x``'s shape (must not share memory with ``x``).
    row_sumsq_out: optional fp32 ``x.shape[:-1]`` output receiving sum_j O_ij^2 of the
        returned bf16 O, reduced in the last product's epilogue (deterministic).
    workspace: optional :class:`NSWorkspace` (see :func:`newton_schulz_workspace`).
    config: explicit :class:`NSConfig` (default: per-shape heuristics for ``props``).
    autotune: time candidate configs once per (shape, dtype, GPU) and cache the winner
        (default: the ``TRASMUON_NS_AUTOTUNE`` environment variable, off).
    props: the device the configs are chosen for (default: ``x``'s).
    overwrite_input: a bf16 ``x`` may be overwritten (it is the ping-pong spare for an odd
        number of steps, 3 or more).
    Returns ``out`` (bf16, shape of ``x``).
    """
    schedule = check_schedule(schedule)
    out = _checked_out(x, fro_sumsq, out, row_sumsq_out)
    if torch.compiler.is_compiling():
        flat = [float(v) for triple in schedule for v in triple]
        torch.ops.trasmuon_kernels.newton_schulz_out(
            x, flat, float(eps), fro_sumsq, out, row_sumsq_out
        )
        return out
    check_device("x", x, props)
    if config is None and _autotune_requested(autotune):
        config = _tuned_config(x, float(eps), fro_sumsq, props_for(x, props))
    prepared = _prepare_checked(
        x, schedule, float(eps), fro_sumsq=fro_sumsq, out=out, row_sumsq_out=row_sumsq_out,
        workspace=workspace, config=config, props=props, overwrite_input=overwrite_input,
    )
    run_all(prepared)
    return prepared.result
