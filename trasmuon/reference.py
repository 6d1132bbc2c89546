"""Eager reference math for TrasMuon, NorMuon, Muon and AdamW.

This module is the one place where the update rules of docs/rule.md are written down as
code. The eager backend of the optimizers calls these functions, the Triton kernels in
``trasmuon_kernels`` are tested against them, and the benchmarks import them. Every
function accepts leading batch dimensions (a stack of same-shape matrices) so that a
bucketed kernel can be compared with one call.

Conventions: ``d_out`` is ``size(-2)``, ``d_in`` is ``size(-1)``. Optimizer state is held
in ``state_dtype(param.dtype)`` (float32, or float64 for float64 params), except a matrix
rule's momentum when its group sets ``state_dtype=torch.bfloat16`` (stored in bf16 with
stochastic rounding, ``stochastic_round_bf16``; computed in float32). Functions whose
name ends in ``_`` update their first arguments in place.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
from collections.abc import Callable, Mapping, MutableMapping, Sequence

import torch
from torch import Tensor

NSTriple = tuple[float, float, float]

# docs/rule.md step 3: the released TrasMuon schedule, one (a, b, c) triple per Newton-Schulz step.
TRASMUON_NS_COEFFICIENTS: tuple[NSTriple, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
# Keller Jordan's quintic, used every step by Muon (and by torch.optim.Muon).
MUON_NS_COEFFICIENTS: NSTriple = (3.4445, -4.7750, 2.0315)

# docs/rule.md step 6: added to ||O_base||_F before dividing.
ETA_HAT_EPS = 1e-12
# docs/rule.md step 9: added to S before dividing C by it.
SCHEDULE_FREE_EPS = 1e-12

ENERGY_SOURCES = ("momentum", "grad", "update")
MUON_LR_ADJUSTMENTS = (None, "original", "match_rms_adamw")
NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Dtype of optimizer state for a parameter: float32, or float64 for float64 params."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# Overflow (docs/usage.md, "Huge gradients")
# --------------------------------------------------------------------------------------
def saturate(sumsq: Tensor) -> Tensor:
    """min(x, the dtype's largest finite value): a sum of squares of finite values is finite
    or +inf (never NaN), so this keeps it finite and changes no finite value."""
    return sumsq.clamp(max=torch.finfo(sumsq.dtype).max)


def saturate_(sumsq: Tensor) -> Tensor:
    """``saturate`` in place (state that holds squares, after each update)."""
    return sumsq.clamp_(max=torch.finfo(sumsq.dtype).max)


def overflow_scale(x: Tensor, sumsq: Tensor) -> Tensor:
    """The power of two each matrix of ``x`` (``(..., m, n)``) is scaled by before
    Newton-Schulz normalizes it: 1 where its sum of squares ``sumsq`` (``(..., 1, 1)``) is
    finite; where it overflowed, 2^(2-E) for max|x| = f * 2^E, f in [0.5, 1), which brings
    max|x| into [2, 4) so the sum of squares is finite again. Scaling by a power of two is
    exact (but for entries that underflow, far below the rounding of the iteration), and the
    iteration is scale invariant, so O does not change."""
    amax = x.abs().amax(dim=(-2, -1), keepdim=True)
    exponent = torch.frexp(amax).exponent
    scale = torch.ldexp(torch.ones_like(amax), 2 - exponent)
    return torch.where(torch.isinf(sumsq), scale, torch.ones_like(scale))


# --------------------------------------------------------------------------------------
# Newton-Schulz (docs/rule.md step 3)
# --------------------------------------------------------------------------------------
def is_ns_triple(value: object) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 3
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
    )


def ns_schedule(
    coefficients: NSTriple | Sequence[NSTriple], steps: int
) -> tuple[NSTriple, ...]:
    """The (a, b, c) triple of each of ``steps`` Newton-Schulz iterations.

    ``coefficients`` is one triple (used every step) or a schedule of triples. A schedule
    shorter than ``steps`` repeats its last triple; a longer one is cut to ``steps``.
    """
    if is_ns_triple(coefficients):
        triples = (tuple(float(v) for v in coefficients),)
    else:
        triples = tuple(tuple(float(v) for v in triple) for triple in coefficients)
    if not triples:
        raise ValueError("ns_coefficients must hold at least one (a, b, c) triple")
    if steps <= len(triples):
        return triples[:steps]
    return triples + (triples[-1],) * (steps - len(triples))


# How a CPU computes the bf16/fp16 products of Newton-Schulz (see ``newton_schulz``).
CPU_PRODUCTS = ("emulated", "native")


@functools.cache
def default_cpu_products(dtype: torch.dtype) -> str:
    """"native" where this CPU has matrix instructions for ``dtype`` (AVX512-BF16 or AMX
    tiles for bf16, AMX-FP16 for fp16), where PyTorch's own low-precision matmul is the faster
    path; "emulated" elsewhere, where PyTorch's CPU bf16/fp16 matmul is many times slower than
    the float32 emulation. Measurements: docs/benchmarks.md."""
    cpu = getattr(torch, "cpu", None)

    def has(name: str) -> bool:
        probe = getattr(cpu, name, None)
        try:
            return bool(probe()) if probe is not None else False
        except Exception:  # a build without the probe
            return False

    if dtype == torch.bfloat16 and (has("_is_avx512_bf16_supported") or has("_is_amx_tile_supported")):
        return "native"
    if dtype == torch.float16 and has("_is_amx_fp16_supported"):
        return "native"
    return "emulated"


def _ns_start(matrix: Tensor, eps: float, dtype: torch.dtype, cpu_products: str | None):
    """What both Newton-Schulz forms start with: ``(x, rounded, transpose)``, x the
    normalized, rounded (B, s, l) iterate (s the short side; transposed when d_out > d_in),
    ``rounded`` the one rounding to ``dtype`` every product takes (see ``newton_schulz``)."""
    if matrix.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(matrix.shape)}")
    if cpu_products is not None and cpu_products not in CPU_PRODUCTS:
        raise ValueError(f"cpu_products must be None or one of {CPU_PRODUCTS}, got {cpu_products!r}")
    d_out, d_in = matrix.shape[-2:]
    transpose = d_out > d_in
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    low = dtype in (torch.bfloat16, torch.float16)
    emulate = matrix.device.type == "cpu" and low and (
        (cpu_products or default_cpu_products(dtype)) == "emulated")

    def rounded(t: Tensor) -> Tensor:
        t = t.to(dtype)
        return t.to(acc) if emulate else t

    x = matrix.mT if transpose else matrix
    x = rounded(x).reshape(-1, *x.shape[-2:]).to(acc)
    # Scale before squaring where ||X||_F overflows (``overflow_scale``): same O, no inf.
    # On the CPU reading the norms back is free: the scaling (three passes over X) runs only
    # where a norm did overflow; elsewhere it multiplies by 1 and the norm is the same.
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    if x.device.type != "cpu" or bool(torch.isinf(norm).any()):
        x = x * overflow_scale(x, norm)
        norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    # In place where X is already a copy of the input (it is unless dtype is the input's).
    copied = x.untyped_storage().data_ptr() != matrix.untyped_storage().data_ptr()
    x = rounded(x.div_(norm + eps) if copied else x / (norm + eps))
    return x, rounded, transpose


def newton_schulz(
    matrix: Tensor,
    schedule: Sequence[NSTriple],
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
    *,
    cpu_products: str | None = None,
) -> Tensor:
    """Approximate the orthogonal polar factor of ``matrix`` (shape ``(..., d_out, d_in)``).

    X = dtype(M), transposed when d_out > d_in so the Gram matrix is the small side;
    X <- X / (||X||_F + eps) (norm accumulated in float32, or float64 for float64; where
    that overflows, X is first scaled by a power of two, ``overflow_scale``: same O);
    then per (a, b, c): A = X X^T, B = b A + c A A, X = a X + B X. Each product
    accumulates in float32 and rounds once to ``dtype`` (``baddbmm`` fuses the b A and
    a X terms, as the kernels do). Returns a tensor of ``dtype`` shaped like ``matrix``.

    On the CPU a bf16/fp16 product is computed either by PyTorch's native low-precision
    matmul (``cpu_products="native"``) or in float32 on the (exactly representable)
    low-precision operands, rounded to ``dtype`` after each product (``"emulated"``): the
    same arithmetic up to accumulation order. None picks by the CPU's capability
    (``default_cpu_products``).
    """
    x, rounded, transpose = _ns_start(matrix, eps, dtype, cpu_products)
    for a, b, c in schedule:
        gram = rounded(torch.bmm(x, x.mT))
        poly = rounded(torch.baddbmm(gram, gram, gram, beta=b, alpha=c))
        x = rounded(torch.baddbmm(x, poly, x, beta=a, alpha=1.0))
    if transpose:
        x = x.mT
    return x.to(dtype).reshape(matrix.shape)


# Gram Newton-Schulz (docs/rule.md, "Gram Newton-Schulz"). ``ns_method``: "standard" (the
# papers' iteration), "gram" (the Gram form where it takes fewer FLOPs than the standard one,
# ``uses_gram``), "gram-always" (the Gram form for every shape).
NS_METHODS = ("standard", "gram", "gram-always")
# After how many steps the Gram form restarts (recomputes R = X X^T from X = Q X0), as
# DeepSpeed's Muon does by default.
DEFAULT_NS_RESTARTS: tuple[int, ...] = (2,)


def gram_segments(steps: int, restarts: Sequence[int]) -> tuple[int, ...]:
    """The lengths of the Gram form's segments: ``steps`` cut after each restart r with
    0 < r < steps (a restart at or past the last step changes nothing and is ignored)."""
    cuts = sorted({int(r) for r in restarts if 0 < r < steps})
    bounds = (0, *cuts, steps)
    return tuple(hi - lo for lo, hi in itertools.pairwise(bounds) if hi > lo)


def newton_schulz_flops(
    d_out: int, d_in: int, steps: int, *, gram: bool = False, restarts: Sequence[int] = (),
    symmetric: bool = True,
) -> int:
    """Floating point operations of ``steps`` Newton-Schulz steps on one (d_out, d_in) matrix,
    as the kernels compute them, with s = min, l = max. A product of a (p, k) by a (k, q)
    matrix is 2 p q k; a symmetric one (X X^T, A A: only the upper triangle with the
    diagonal is computed, ``symmetric``) is p (p + 1) k. Elementwise terms are not counted.

    Standard, per step: X X^T (sym, s x s x l), A A (sym, s^3), B X (2 s^2 l).
    Gram, per segment of L steps (``gram_segments``): R = X X^T (sym, s x s x l); per step
    R R (sym, s^3); Q <- a Q + Z Q (2 s^3, none at the segment's first step, where Q = aI + Z);
    R <- P R P as two products (4 s^3, none at the segment's last step); at the segment's end
    X = Q X (2 s^2 l)."""
    s, long = sorted((int(d_out), int(d_in)))

    def sym(p: int, k: int) -> int:
        return p * (p + 1) * k if symmetric else 2 * p * p * k

    if not gram:
        return steps * (sym(s, long) + sym(s, s) + 2 * s * s * long)
    total = 0
    for length in gram_segments(steps, restarts):
        total += sym(s, long) + length * sym(s, s) + (length - 1) * 6 * s**3 + 2 * s * s * long
    return total


def uses_gram(method: str, shape: Sequence[int], steps: int, restarts: Sequence[int]) -> bool:
    """Whether ``ns_method`` ``method`` takes the Gram form for (d_out, d_in) ``shape``:
    never for "standard", always for "gram-always", and for "gram" where it takes fewer FLOPs
    (``newton_schulz_flops``, symmetric products): for 5 steps and a restart after 2, where
    the long side exceeds about twice the short side (never for square matrices)."""
    if method not in NS_METHODS:
        raise ValueError(f"ns_method must be one of {NS_METHODS}, got {method!r}")
    if method != "gram":
        return method == "gram-always"
    d_out, d_in = shape[-2:]
    return (newton_schulz_flops(d_out, d_in, steps, gram=True, restarts=restarts)
            < newton_schulz_flops(d_out, d_in, steps))


def upper_mirrored(t: Tensor) -> Tensor:
    """``t`` (..., s, s) with its strict lower triangle replaced by the transpose of its
    upper one: exactly symmetric (an exact operation, no rounding)."""
    upper = torch.triu(t)
    return upper + torch.triu(t, 1).mT


def gram_newton_schulz(
    matrix: Tensor,
    schedule: Sequence[NSTriple],
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
    *,
    restarts: Sequence[int] = DEFAULT_NS_RESTARTS,
    cpu_products: str | None = None,
    observe: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """``newton_schulz`` in its Gram form: the same polynomial of X in exact arithmetic,
    iterated on the s x s matrix R = X X^T instead of the s x l matrix X.

    Input, transposition, normalization (and its overflow guard), ``dtype`` and
    ``cpu_products`` as in ``newton_schulz``. Then, per segment of steps (``gram_segments``:
    the steps are cut after each iteration in ``restarts``), starting from the segment's X:

    * R = X X^T;
    * per (a, b, c): Z = b R + c R R; Q = a I + Z at the segment's first step, else
      Q <- a Q + Z Q (Q <- P Q with P = a I + Z); unless it is the segment's last step,
      T = a R + R Z, R <- a T + Z T (R <- P R P), then R's lower triangle is replaced by
      the mirror of its upper one (``upper_mirrored``: R P R is symmetric only in exact
      arithmetic, and the kernels' products take R as exactly symmetric; left asymmetric,
      the kernels' R R^T doubled the bf16 error);
    * X <- Q X.

    O is the last segment's X (transposed back). Each of R, Z, Q, T, the new R and the new X
    is one product (``bmm``/``baddbmm``, the a- and b-terms fused) that accumulates in
    float32 and rounds once to ``dtype``; Q = a I + Z is one float32 add rounded once. In
    finite precision R drifts from X X^T (P and R commute only in exact arithmetic); a
    restart recomputes R from X (``tests/kernels/test_gram_newton_schulz.py`` measures it).

    ``observe(step, R, Q, X)``, when given, is called after each step with the segment's X,
    the current Q and R (R after this step's update; the segment's last step has none).
    """
    x, rounded, transpose = _ns_start(matrix, eps, dtype, cpu_products)
    eye = torch.eye(x.shape[-2], dtype=x.dtype, device=x.device)
    step = 0
    for length in gram_segments(len(schedule), restarts):
        r = rounded(torch.bmm(x, x.mT))
        q = None
        for j in range(length):
            a, b, c = schedule[step]
            z = rounded(torch.baddbmm(r, r, r, beta=b, alpha=c))
            q = rounded(z + a * eye) if q is None else rounded(torch.baddbmm(q, z, q, beta=a, alpha=1.0))
            if j < length - 1:
                t = rounded(torch.baddbmm(r, r, z, beta=a, alpha=1.0))
                r = upper_mirrored(rounded(torch.baddbmm(t, z, t, beta=a, alpha=1.0)))
            if observe is not None:
                observe(step, r, q, x)
            step += 1
        x = rounded(torch.bmm(q, x))
    if transpose:
        x = x.mT
    return x.to(dtype).reshape(matrix.shape)


# Block (per-head) Newton-Schulz (docs/rule.md, "Per-head orthogonalization"): a group's
# ``ns_blocks = (row_blocks, col_blocks)`` cuts the (d_out, d_in) matrix into that grid of
# equal blocks, each orthogonalized as a matrix of its own.
DEFAULT_NS_BLOCKS: tuple[int, int] = (1, 1)


def ns_blocks_problem(blocks: Sequence[int], shape: Sequence[int]) -> str | None:
    """What is wrong with cutting a (d_out, d_in) ``shape`` into ``blocks`` = (row_blocks,
    col_blocks) equal blocks (None when nothing is): each count must divide its side."""
    (rb, cb), (d_out, d_in) = blocks, shape[-2:]
    if d_out % rb or d_in % cb:
        return (f"ns_blocks={(rb, cb)} must divide the (d_out, d_in) = {(d_out, d_in)} matrix "
                f"(row_blocks divides d_out, col_blocks divides d_in)")
    return None


def ns_block_shape(shape: Sequence[int], blocks: Sequence[int]) -> tuple[int, int]:
    """The (d_out / row_blocks, d_in / col_blocks) shape of each block of a (d_out, d_in)
    matrix cut into ``blocks``."""
    (rb, cb), (d_out, d_in) = blocks, shape[-2:]
    if ns_blocks_problem((rb, cb), (d_out, d_in)) is not None:
        raise ValueError(ns_blocks_problem((rb, cb), (d_out, d_in)))
    return d_out // rb, d_in // cb


def split_blocks(matrix: Tensor, blocks: Sequence[int]) -> Tensor:
    """``matrix`` (..., d_out, d_in) as the stack (..., rb * cb, d_out / rb, d_in / cb) of its
    ``blocks`` = (rb, cb) grid of blocks, row-major over the grid (block (i, j) at i * cb + j).

    A split along rows only (cb = 1) is a view of a contiguous matrix (its rows are already
    consecutive); a split along columns permutes the grid's axes, which ``reshape`` copies."""
    rb, cb = blocks
    bm, bn = ns_block_shape(matrix.shape, blocks)
    lead = matrix.shape[:-2]
    grid = matrix.reshape(*lead, rb, bm, cb, bn).movedim(-2, -3)  # (..., rb, cb, bm, bn)
    return grid.reshape(*lead, rb * cb, bm, bn)


def merge_blocks(stack: Tensor, blocks: Sequence[int]) -> Tensor:
    """The inverse of ``split_blocks``: a stack (..., rb * cb, bm, bn) of blocks put back
    into the (..., rb * bm, cb * bn) matrix, block (i, j) at rows i * bm.., columns j * bn..
    (a view when cb = 1 and the stack is contiguous, a copy otherwise)."""
    rb, cb = blocks
    bm, bn = stack.shape[-2:]
    lead = stack.shape[:-3]
    grid = stack.reshape(*lead, rb, cb, bm, bn).movedim(-3, -2)  # (..., rb, bm, cb, bn)
    return grid.reshape(*lead, rb * bm, cb * bn)


def blocked_newton_schulz(
    matrix: Tensor,
    blocks: Sequence[int],
    ns: Callable[[Tensor], Tensor],
) -> Tensor:
    """``ns`` (``newton_schulz`` or ``gram_newton_schulz`` with their other arguments bound)
    applied to each block of ``matrix``'s ``blocks`` grid as a matrix of its own (its own
    Frobenius normalization, its own iteration), the results assembled into O of
    ``matrix``'s shape, contiguous. ``blocks`` = (1, 1) is ``ns(matrix)`` unchanged."""
    if tuple(blocks) == DEFAULT_NS_BLOCKS:
        return ns(matrix)
    return merge_blocks(ns(split_blocks(matrix, blocks)), blocks).contiguous()


# --------------------------------------------------------------------------------------
# Momentum (docs/rule.md step 2)
# --------------------------------------------------------------------------------------
def momentum_update_(momentum: Tensor, grad: Tensor, beta: float) -> None:
    """M <- beta*M + (1-beta)*G, as M + (1-beta)*(G - M) (``lerp``, like torch.optim.Muon)."""
    momentum.lerp_(grad.to(momentum.dtype), 1.0 - beta)


def nesterov_input(momentum: Tensor, grad: Tensor, beta: float) -> Tensor:
    """(1-beta)*G + beta*M: what Newton-Schulz sees when ``nesterov=True``."""
    return grad.to(momentum.dtype).lerp(momentum, beta)


# --------------------------------------------------------------------------------------
# Memory-lean momentum: bf16 storage with stochastic rounding (docs/usage.md, "state_dtype")
# --------------------------------------------------------------------------------------
# What a matrix rule's group may set as ``state_dtype``: None (``state_dtype(param.dtype)``,
# float32 or float64), float32 (the same for fp32/bf16/fp16 params) or bfloat16 (the momentum
# stored in bf16, rounded stochastically; every other state entry stays float32).
STATE_DTYPES = (None, torch.float32, torch.bfloat16)
_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9
BF16_MAX = torch.finfo(torch.bfloat16).max


def momentum_dtype(group_state_dtype: torch.dtype | None, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype a matrix rule stores its momentum in: the group's ``state_dtype`` when it
    sets one, else ``state_dtype(param_dtype)``."""
    return group_state_dtype if group_state_dtype is not None else state_dtype(param_dtype)


def compute_dtype(stored: torch.dtype) -> torch.dtype:
    """The dtype the rules compute in for state stored as ``stored``: float32 for a bf16
    momentum, the stored dtype otherwise."""
    return torch.float32 if stored == torch.bfloat16 else stored


def fmix32_int(h: int) -> int:
    """MurmurHash3's 32-bit finalizer on a Python int (the host half of the hash)."""
    h &= _MASK32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _mul32(h: Tensor, c: int) -> Tensor:
    """h * c mod 2^32 for int64 ``h`` in [0, 2^32) without overflowing int64: the 32-bit
    constant is split into 16-bit halves (each product < 2^48)."""
    lo = h * (c & 0xFFFF)
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finalizer elementwise on an int64 tensor of values in [0, 2^32):
    the same integer operations as the kernels' uint32 ``fmix32`` (wraparound as masks)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def sr_seed32(seed: int) -> int:
    """A seed of any size >= 0 folded to 32 bits (both halves of a 64-bit seed count)."""
    return (seed ^ (seed >> 32)) & _MASK32


def sr_matrix_key(seed: int, param_index: int, expert: int = 0) -> int:
    """The 32-bit key of one matrix's random stream: the optimizer's seed, the parameter's
    index in the optimizer (its place in the param groups, the same on every rank) and, for
    an expert stack, the expert's global index."""
    h = fmix32_int(sr_seed32(seed) ^ _GOLDEN32)
    h = fmix32_int(h ^ (param_index & _MASK32))
    return fmix32_int(h ^ (expert & _MASK32))


def sr_stream(key: int, step: int) -> int:
    """The 32-bit stream of a matrix at step t: fmix32(key ^ fmix32(t)). The kernels compute
    it from the key and the device step counter with the same operations."""
    return fmix32_int(key ^ fmix32_int(step))


def sr_bits(shape: Sequence[int], stream: int | Tensor, *, row0: int = 0, col0: int = 0,
            d_in: int | None = None, device: torch.device | str = "cpu") -> Tensor:
    """32 random bits (int64 in [0, 2^32)) for each element of a ``(..., rows, cols)`` block of
    (out, in) matrices whose first element is (``row0``, ``col0``) of a matrix with ``d_in``
    columns (default: ``cols``): fmix32(n ^ stream) with n = (row0 + i) * d_in + (col0 + j)
    mod 2^32, the element's index in the whole matrix (so a block held by one rank gets the
    bits the whole matrix would). ``stream``: one int, or an int64 tensor broadcastable to
    ``(..., 1, 1)`` (one per matrix of a stack)."""
    rows, cols = shape[-2], shape[-1]
    d_in = cols if d_in is None else d_in
    r = torch.arange(row0, row0 + rows, dtype=torch.int64, device=device)
    c = torch.arange(col0, col0 + cols, dtype=torch.int64, device=device)
    index = (r[:, None] * d_in + c[None, :]) & _MASK32
    if isinstance(stream, Tensor):
        stream = stream.to(device=device, dtype=torch.int64)
    return fmix32(index ^ stream)


def stochastic_round_bf16(x: Tensor, bits: Tensor) -> Tensor:
    """float32 ``x`` rounded to bf16 stochastically: the low 16 random ``bits`` (int64, the
    top half of each 32-bit value) are added below bf16's mantissa to x's bit pattern, which
    is then truncated, so x rounds away from zero with probability (dropped bits) / 2^16 and
    E[result] = x. Exact for bf16-representable x. A finite x never becomes inf (it
    saturates at +-bf16 max); inf stays inf and NaN becomes bf16's canonical NaN."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16 takes float32, got {x.dtype}")
    b = x.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    out = (b + (bits >> 16)) >> 16
    magnitude = b & 0x7FFFFFFF
    overflowed = (magnitude < 0x7F800000) & ((out & 0x7FFF) == 0x7F80)
    out = torch.where(overflowed, (out & 0x8000) | 0x7F7F, out)
    out = torch.where(magnitude > 0x7F800000, 0x7FC0, out)
    out = out - ((out & 0x8000) << 1)  # as a signed 16-bit pattern
    return out.to(torch.int16).view(torch.bfloat16).view(x.shape)


def convert_state(value: Tensor, dtype: torch.dtype) -> Tensor:
    """A state tensor converted to ``dtype`` once (a checkpoint or a group that changed its
    ``state_dtype``): to bf16 by round-to-nearest-even after clamping to bf16's finite range
    (deterministic; a finite value stays finite), any other way exactly as ``.to`` (bf16 to
    float32 is exact). Always a new tensor."""
    if dtype == torch.bfloat16 and value.dtype != torch.bfloat16:
        return value.detach().clamp(-BF16_MAX, BF16_MAX).to(dtype)
    return value.detach().to(dtype, copy=True)


class StochasticRounding:
    """Where the random bits of one momentum update come from: the matrix key(s)
    (``sr_matrix_key``), the step(s) t, and the block's place in the whole (out, in) matrix.
    ``key`` and ``step`` are ints for one matrix, or sequences (one per matrix of a stack)."""

    def __init__(self, key: int | Sequence[int], step: int | Sequence[int], *, row0: int = 0,
                 col0: int = 0, d_in: int | None = None) -> None:
        self.key, self.step, self.row0, self.col0, self.d_in = key, step, row0, col0, d_in

    def bits(self, shape: Sequence[int], device: torch.device | str) -> Tensor:
        if isinstance(self.key, int):
            stream: int | Tensor = sr_stream(self.key, int(self.step))
        else:
            steps = [self.step] * len(self.key) if isinstance(self.step, int) else self.step
            stream = torch.tensor([sr_stream(k, int(t)) for k, t in zip(self.key, steps, strict=True)],
                                  dtype=torch.int64).view(-1, 1, 1)
        return sr_bits(shape, stream, row0=self.row0, col0=self.col0, d_in=self.d_in, device=device)

    def round(self, x: Tensor) -> Tensor:
        """float32 ``x`` (this block) stochastically rounded to bf16."""
        return stochastic_round_bf16(x, self.bits(x.shape, x.device))


# --------------------------------------------------------------------------------------
# Row scaling and step size (docs/rule.md steps 4-6)
# --------------------------------------------------------------------------------------
def row_sumsq(ortho: Tensor, acc_dtype: torch.dtype = torch.float32) -> Tensor:
    """sum_j O_ij^2 per row, accumulated in ``acc_dtype``: shape ``(..., d_out)``."""
    o = ortho.to(acc_dtype)
    return saturate((o * o).sum(dim=-1))


def row_second_moment_update_(row_v: Tensor, rowsumsq: Tensor, d_in: int, beta2: float) -> None:
    """v <- beta2*v + (1-beta2) * mean_j O_ij^2."""
    saturate_(row_v.mul_(beta2).add_(rowsumsq / d_in, alpha=1.0 - beta2))


def row_scale(row_v: Tensor, eps: float) -> Tensor:
    """1 / (sqrt(v) + eps): O_base = O * row_scale[:, None]."""
    return 1.0 / (row_v.sqrt() + eps)


def eta_hat(
    scale: float,
    lr: float | Tensor,
    d_out: int,
    d_in: int,
    rowsumsq: Tensor,
    rowscale: Tensor,
) -> Tensor:
    """scale * lr * sqrt(d_out*d_in) / (||O_base||_F + 1e-12), shape ``(...)``."""
    return eta_hat_from_sumsq(scale, lr, d_out, d_in, o_base_sumsq(rowsumsq, rowscale))


def o_base_sumsq(rowsumsq: Tensor, rowscale: Tensor) -> Tensor:
    """||O_base||_F^2 = sum_i rowsumsq_i * rowscale_i^2: no second pass over O."""
    return (rowsumsq * rowscale * rowscale).sum(dim=-1)


def eta_hat_from_sumsq(
    scale: float, lr: float | Tensor, d_out: int, d_in: int, base_sumsq: Tensor
) -> Tensor:
    """eta_hat from ||O_base||_F^2 (which a sharded matrix sums over its blocks)."""
    return eta_hat_scale(scale, d_out, d_in) * lr / (base_sumsq.sqrt() + ETA_HAT_EPS)


def eta_hat_scale(scale: float, d_out: int, d_in: int) -> float:
    """The numerator's constant scale * sqrt(d_out*d_in) (the update kernel takes it as is)."""
    return scale * math.sqrt(d_out * d_in)


# --------------------------------------------------------------------------------------
# Column energies and the robust reference (docs/rule.md steps 7-8)
# --------------------------------------------------------------------------------------
def column_energy(source: Tensor, acc_dtype: torch.dtype = torch.float32) -> Tensor:
    """E_j = sum_i S_ij^2, accumulated in ``acc_dtype``: shape ``(..., d_in)``."""
    s = source.to(acc_dtype)
    return saturate((s * s).sum(dim=-2))


def quantile_rank(n: int, q: float) -> int:
    """k = clamp(floor(q*n + 0.5), 1, n): the 1-based rank of the q-quantile of n values."""
    return min(max(math.floor(q * n + 0.5), 1), n)


def kth_smallest(values: Tensor, k: int) -> Tensor:
    """The k-th smallest (1-based) entry along the last dim: shape ``values.shape[:-1]``."""
    return torch.kthvalue(values, k, dim=-1).values


def energy_ref_update_(energy_ref: Tensor, energy_cur: Tensor, beta: float) -> None:
    """E_ref <- beta*E_ref + (1-beta)*E_cur (after E_ref was set to E_cur at its first step)."""
    saturate_(energy_ref.mul_(beta).add_(energy_cur, alpha=1.0 - beta))


def energy_ratio(energy: Tensor, energy_ref: Tensor, energy_eps: float) -> Tensor:
    """r_j = E_j / (E_ref + energy_eps)."""
    return energy / (energy_ref.unsqueeze(-1) + energy_eps)


def gate_from_ratio(ratio: Tensor, alpha: float, c_min: float, trigger: float | None) -> Tensor:
    """c_j = clamp(1 / (1 + alpha*ln(1 + r_j)), c_min, 1); c_j = 1 where r_j <= trigger."""
    gate = (1.0 / (1.0 + alpha * torch.log(1.0 + ratio))).clamp(c_min, 1.0)
    if trigger is not None:
        gate = torch.where(ratio <= trigger, torch.ones_like(gate), gate)
    return gate


def gate_is_on(clip: bool, d_in: int, clip_min_cols: int) -> bool:
    """Whether a matrix has a column gate at all (docs/rule.md step 10)."""
    return bool(clip) and d_in >= clip_min_cols


def gate_updates_at(step: int, warmup_steps: int, clip_period: int) -> bool:
    """Step 10 of docs/rule.md: the gate EMA moves at t > warmup and (t mod period == 0 or t == 1)."""
    return step > warmup_steps and (step % clip_period == 0 or step == 1)


def init_gate_state(
    state: MutableMapping[str, Tensor],
    batch_shape: tuple[int, ...],
    d_in: int,
    schedule_free: bool,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Create the per-matrix gate state that ``gate_stage_`` needs, where it is missing.

    ``energy_ref`` is created by the first ``gate_stage_`` call (E_ref = E_cur there).
    """
    if "c_ema" not in state:
        state["c_ema"] = torch.ones(*batch_shape, d_in, device=device, dtype=dtype)
    if schedule_free and "sf_lr2_sum" not in state:
        state["sf_lr2_sum"] = torch.zeros(batch_shape, device=device, dtype=dtype)
        state["sf_c_lr2_sum"] = torch.zeros(*batch_shape, d_in, device=device, dtype=dtype)
        state["c_last"] = torch.ones(*batch_shape, d_in, device=device, dtype=dtype)


def schedule_free_average(sf_lr2_sum: Tensor, sf_c_lr2_sum: Tensor) -> Tensor:
    """c_avg = C / (S + 1e-12) once S > 0, else 1."""
    avg = sf_c_lr2_sum / (sf_lr2_sum.unsqueeze(-1) + SCHEDULE_FREE_EPS)
    return torch.where(sf_lr2_sum.unsqueeze(-1) > 0, avg, torch.ones_like(avg))


def gate_stage_(
    state: MutableMapping[str, Tensor],
    energy: Tensor,
    step: int,
    lr: float | Tensor,
    *,
    warmup_steps: int,
    clip_period: int,
    clip_alpha: float,
    clip_min: float,
    clip_trigger: float | None,
    clip_beta: float,
    energy_beta: float,
    energy_quantile: float,
    energy_eps: float,
    schedule_free: bool,
    sf_mix: float,
) -> Tensor:
    """Steps 8-11 of docs/rule.md for a gated matrix (or a stack): returns the applied gate c.

    ``energy`` has shape ``(..., d_in)``; ``state`` holds ``c_ema`` (and ``sf_lr2_sum``,
    ``sf_c_lr2_sum``, ``c_last`` with ``schedule_free``) from ``init_gate_state`` and gets
    ``energy_ref`` here. ``step`` is the 1-based step t of this update.
    """
    d_in = energy.shape[-1]
    energy_cur = kth_smallest(energy, quantile_rank(d_in, energy_quantile))
    if "energy_ref" not in state:
        state["energy_ref"] = saturate(energy_cur)
    else:
        energy_ref_update_(state["energy_ref"], energy_cur, energy_beta)

    post_warmup = step > warmup_steps
    if schedule_free and post_warmup:
        lr2 = lr * lr
        state["sf_lr2_sum"].add_(lr2)
        state["sf_c_lr2_sum"].add_(state["c_last"] * lr2)

    c_ema = state["c_ema"]
    if gate_updates_at(step, warmup_steps, clip_period):
        ratio = energy_ratio(energy, state["energy_ref"], energy_eps)
        gate = gate_from_ratio(ratio, clip_alpha, clip_min, clip_trigger)
        c_ema.mul_(clip_beta).add_(gate, alpha=1.0 - clip_beta)

    if not post_warmup:
        applied = torch.ones_like(c_ema)
    elif schedule_free:
        c_avg = schedule_free_average(state["sf_lr2_sum"], state["sf_c_lr2_sum"])
        applied = (1.0 - sf_mix) * c_ema + sf_mix * c_avg
    else:
        applied = c_ema.clone()
    if schedule_free:
        state["c_last"].copy_(applied)
    return applied


# --------------------------------------------------------------------------------------
# The weight update (docs/rule.md steps 1 and 12)
# --------------------------------------------------------------------------------------
def widened(ortho: Tensor, dtype: torch.dtype, like: Tensor | None = None,
            factor: Tensor | float | None = None) -> Tensor:
    """A new tensor: O in ``dtype`` (exact), laid out in memory like ``like`` when given (see
    ``matrix_update``), times ``factor`` when given (in place: in ``dtype``). One
    mixed-dtype multiply would save a pass but runs unvectorized on a CPU."""
    if like is not None and like.shape == ortho.shape:
        out = torch.empty_like(like, dtype=dtype).copy_(ortho)
    else:
        out = ortho.to(dtype, copy=True)
    return out if factor is None else out.mul_(factor)


def matrix_update(
    ortho: Tensor, row_factor: Tensor, col_gate: Tensor | None, acc_dtype: torch.dtype,
    like: Tensor | None = None,
) -> Tensor:
    """U_ij = row_factor_i * c_j * O_ij, with row_factor = eta_hat * rowscale (or Muon's lr).
    ``like``: the parameter, whose memory layout U takes (a tall matrix's O is the transpose
    of a contiguous tensor; subtracting a U laid out otherwise from W was 4x slower on a CPU).
    The same values either way: O is widened exactly."""
    update = widened(ortho, acc_dtype, like, factor=row_factor.unsqueeze(-1))
    if col_gate is not None:
        update.mul_(col_gate.unsqueeze(-2))
    return update


def apply_update_(param: Tensor, update: Tensor, decay: float | Tensor) -> None:
    """W <- decay*W - U, computed in U's dtype and rounded once to W's dtype."""
    if param.dtype == update.dtype:
        if not (isinstance(decay, float) and decay == 1.0):
            param.mul_(decay)
        param.sub_(update)
    else:
        wide = param.to(update.dtype)
        if not (isinstance(decay, float) and decay == 1.0):
            wide.mul_(decay)
        param.copy_(wide.sub_(update))


def weight_decay_factor(lr: float | Tensor, weight_decay: float) -> float | Tensor:
    """1 - lr*weight_decay (decoupled weight decay)."""
    return 1.0 - lr * weight_decay


def muon_lr(lr: float | Tensor, adjust_lr_fn: str | None, d_out: int, d_in: int) -> float | Tensor:
    """Muon's shape-based step size, as torch.optim.Muon: "original" (or None) scales by
    sqrt(max(1, d_out/d_in)); "match_rms_adamw" by 0.2*sqrt(max(d_out, d_in))."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, d_out / d_in))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(d_out, d_in))
    raise ValueError(f"unknown adjust_lr_fn {adjust_lr_fn!r}; expected one of {MUON_LR_ADJUSTMENTS}")


# --------------------------------------------------------------------------------------
# One eager step per rule
# --------------------------------------------------------------------------------------
def momentum_stage_(
    grad: Tensor, state: MutableMapping[str, Tensor], beta1: float, nesterov: bool,
    rounding: StochasticRounding | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Step 2 of docs/rule.md for a matrix rule: update ``state["momentum"]`` and return
    ``(ns_input, grad_wide, momentum)``: what Newton-Schulz orthogonalizes, G and the updated
    momentum in the compute dtype (float32, float64 for float64 state; the momentum is the
    stored tensor itself for float32/float64 state). A bf16 momentum (``state_dtype``) is
    widened to float32, updated there (the same lerp), and stored rounded by ``rounding``
    (``StochasticRounding``); the float32 value (what the kernel holds in registers) is what
    the Nesterov input, Newton-Schulz and the column energies see."""
    momentum = state["momentum"]
    if momentum.dtype != torch.bfloat16:
        grad_wide = grad.to(momentum.dtype)
        momentum_update_(momentum, grad_wide, beta1)
        ns_in = nesterov_input(momentum, grad_wide, beta1) if nesterov else momentum
        return ns_in, grad_wide, momentum
    if rounding is None:
        raise ValueError("a bf16 momentum is updated with stochastic rounding: pass rounding=")
    wide = momentum.to(torch.float32)
    grad_wide = grad.to(torch.float32)
    momentum_update_(wide, grad_wide, beta1)
    ns_in = nesterov_input(wide, grad_wide, beta1) if nesterov else wide
    momentum.copy_(rounding.round(wide))
    return ns_in, grad_wide, wide


def trasmuon_update_stage_(
    param: Tensor,
    grad_wide: Tensor,
    ortho: Tensor,
    state: MutableMapping[str, Tensor],
    step: int,
    lr: float | Tensor,
    *,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale: float,
    gate_on: bool,
    gate_kwargs: dict,
    energy_source: str,
    shape: tuple[int, int] | None = None,
) -> dict[str, Tensor | None]:
    """Steps 1 and 4-12 of docs/rule.md for one whole TrasMuon (``gate_on``) or NorMuon
    matrix, given O (the rule programs compose the same stages themselves, with the sums
    over rows of a sharded matrix all-reduced in between). Returns the intermediate tensors
    the diagnostics read (no host syncs).
    """
    d_out, d_in = shape if shape is not None else tuple(param.shape[-2:])
    rowscale, base_partial = trasmuon_row_stage_(ortho, state, d_in, beta2=betas[1], eps=eps)
    step_size = eta_hat_from_sumsq(scale, lr, d_out, d_in, base_partial)
    energy = None
    if gate_on:
        energy = trasmuon_energy_partial(state, grad_wide, ortho, rowscale, energy_source)
    gate = trasmuon_apply_stage_(param, ortho, state, rowscale, step_size, energy, step, lr,
                                 weight_decay=weight_decay, gate_kwargs=gate_kwargs)
    return {"eta_hat": step_size, "energy": energy, "gate": gate}


def trasmuon_row_stage_(
    ortho: Tensor, state: MutableMapping[str, Tensor], d_in: int, *, beta2: float, eps: float,
    sumsq: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Steps 4-5 for a matrix (or a block of its rows): updates ``state["row_v"]`` from O's
    row sums of squares (``sumsq``, or summed here from ``ortho``: a block of some of the
    columns needs the whole rows' sums); returns ``(rowscale, partial ||O_base||_F^2 over
    these rows)``."""
    if sumsq is None:
        sumsq = row_sumsq(ortho, compute_dtype(state["momentum"].dtype))
    rowscale = row_normalization_stage_(ortho, state, d_in, beta2=beta2, eps=eps, sumsq=sumsq)
    return rowscale, o_base_sumsq(sumsq, rowscale)


def row_normalization_stage_(
    ortho: Tensor, state: MutableMapping[str, Tensor], d_in: int, *, beta2: float, eps: float,
    sumsq: Tensor | None = None,
) -> Tensor:
    """Steps 4-5 alone: updates ``state["row_v"]`` from O's row sums of squares (``sumsq``, or
    summed here from ``ortho``) and returns rowscale = 1 / (sqrt(v) + eps)."""
    if sumsq is None:
        sumsq = row_sumsq(ortho, compute_dtype(state["momentum"].dtype))
    row_second_moment_update_(state["row_v"], sumsq, d_in, beta2)
    return row_scale(state["row_v"], eps)


def trasmuon_energy_partial(
    state: Mapping[str, Tensor],
    grad_wide: Tensor | None,
    ortho: Tensor | None,
    rowscale: Tensor | None,
    energy_source: str,
) -> Tensor:
    """Step 7 over these rows: the column energies of M, G or O_base (``energy_source``
    "momentum", "grad", "update"; only "update" needs O and its rowscale)."""
    acc = compute_dtype(state["momentum"].dtype)
    if energy_source == "update":
        return update_energy(ortho, rowscale, acc)
    return column_energy(state["momentum"] if energy_source == "momentum" else grad_wide, acc)


def trasmuon_apply_stage_(
    param: Tensor,
    ortho: Tensor,
    state: MutableMapping[str, Tensor],
    rowscale: Tensor,
    step_size: Tensor,
    energy: Tensor | None,
    step: int,
    lr: float | Tensor,
    *,
    weight_decay: float,
    gate_kwargs: dict,
    cols: slice | None = None,
) -> Tensor | None:
    """Steps 8-12 given eta_hat (``step_size``) and the whole matrix's column energies
    (``energy`` None: no gate, NorMuon): the gate, then W's update (of the block of columns
    ``cols`` that ``param`` and ``ortho`` hold, when not all). Returns the whole gate."""
    gate = None if energy is None else gate_stage_(state, energy, step, lr, **gate_kwargs)
    gate_cols = gate if gate is None or cols is None else gate[..., cols]
    update = matrix_update(ortho, step_size.unsqueeze(-1) * rowscale, gate_cols, compute_dtype(state["momentum"].dtype),
                           like=param)
    apply_update_(param, update, weight_decay_factor(lr, weight_decay))
    return gate


def muon_update_stage_(
    param: Tensor,
    ortho: Tensor,
    lr: float | Tensor,
    *,
    weight_decay: float,
    adjust_lr_fn: str | None,
    shape: tuple[int, int] | None = None,
) -> None:
    """Muon's update given O: W <- (1 - lr*wd)*W - muon_lr * O."""
    d_out, d_in = shape if shape is not None else tuple(param.shape[-2:])
    acc = state_dtype(param.dtype)
    step_size = muon_lr(lr, adjust_lr_fn, d_out, d_in)
    row_factor = torch.as_tensor(step_size, dtype=acc, device=param.device).expand(ortho.shape[-2])
    update = matrix_update(ortho, row_factor, None, acc, like=param)
    apply_update_(param, update, weight_decay_factor(lr, weight_decay))


def trasmuon_matrix_step_(
    param: Tensor,
    grad: Tensor,
    state: MutableMapping[str, Tensor],
    step: int,
    lr: float | Tensor,
    *,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    nesterov: bool,
    ns_schedule_: Sequence[NSTriple],
    ns_dtype: torch.dtype,
    scale: float,
    gate_on: bool,
    gate_kwargs: dict,
    energy_source: str,
) -> dict[str, Tensor | None]:
    """One whole TrasMuon/NorMuon step for one matrix (or a stack), steps 1-12 of docs/rule.md:
    ``momentum_stage_``, ``newton_schulz``, ``trasmuon_update_stage_``."""
    ns_in, grad_wide, _ = momentum_stage_(grad, state, betas[0], nesterov)
    ortho = newton_schulz(ns_in, ns_schedule_, eps, ns_dtype)
    return trasmuon_update_stage_(
        param, grad_wide, ortho, state, step, lr, betas=betas, eps=eps,
        weight_decay=weight_decay, scale=scale, gate_on=gate_on, gate_kwargs=gate_kwargs,
        energy_source=energy_source,
    )


def adamw_foreach_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[MutableMapping[str, Tensor]],
    steps: Sequence[int],
    lr: float | Tensor,
    *,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """AdamW with bias correction and decoupled weight decay for a list of tensors with
    ``torch._foreach_*`` ops, in the same order of operations as torch.optim.AdamW's
    single-tensor path (so float32 results agree with it bit for bit):
    m <- lerp(m, g, 1-b1); v <- b2 v + (1-b2) g^2; W <- (1 - lr wd) W - lr/(1-b1^t) *
    m / (sqrt(v)/sqrt(1-b2^t) + eps). ``steps`` holds each tensor's 1-based t."""
    if not params:
        return
    beta1, beta2 = betas
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    grads_wide = [g.to(m.dtype) for g, m in zip(grads, exp_avgs, strict=True)]
    decay = weight_decay_factor(lr, weight_decay)
    torch._foreach_lerp_(exp_avgs, grads_wide, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads_wide, grads_wide, value=1.0 - beta2)
    # A huge g^2 saturates instead of freezing the param at m / sqrt(inf) = 0.
    for dtype in {v.dtype for v in exp_avg_sqs}:
        torch._foreach_clamp_max_([v for v in exp_avg_sqs if v.dtype == dtype], torch.finfo(dtype).max)
    bias_correction1 = [1.0 - beta1**t for t in steps]
    bias_correction2_sqrt = [(1.0 - beta2**t) ** 0.5 for t in steps]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bias_correction2_sqrt)
    torch._foreach_add_(denoms, eps)
    exact = [p.dtype == m.dtype for p, m in zip(params, exp_avgs, strict=True)]
    if not isinstance(lr, Tensor) and all(exact):
        if weight_decay != 0:
            torch._foreach_mul_(list(params), decay)
        torch._foreach_addcdiv_(list(params), exp_avgs, denoms, [-lr / bc for bc in bias_correction1])
        return
    updates = torch._foreach_div(exp_avgs, denoms)
    torch._foreach_mul_(updates, lr)
    torch._foreach_div_(updates, bias_correction1)
    for param, update in zip(params, updates, strict=True):
        apply_update_(param, update, decay)


# --------------------------------------------------------------------------------------
# NAMO and NAMO-D (arXiv 2602.17080; docs/rule.md, "NAMO and NAMO-D")
# --------------------------------------------------------------------------------------
# Newton-Schulz normalization of both rules: X / (||X||_F + 1e-7), with Muon's triple.
NAMO_NS_EPS = 1e-7
# Added to the first-moment bias correction 1 - b1^t before dividing by it.
NAMO_BIAS_EPS = 1e-12
WEIGHT_DECAY_MODES = ("adaptive", "lr")


def namo_base_step(lr: float | Tensor, betas: tuple[float, float], step: int) -> float | Tensor:
    """base = lr * sqrt(1 - b2^t) / (1 - b1^t + 1e-12) (the bias corrections in double)."""
    b1, b2 = betas
    return lr * (math.sqrt(1.0 - b2**step) / (1.0 - b1**step + NAMO_BIAS_EPS))


def namo_shape_factor(scale: float, d_out: int, d_in: int) -> float:
    """scale * sqrt(max(m, n)): applied to the update's step only, not to the decay's."""
    return scale * math.sqrt(max(d_out, d_in))


def second_moment_update_(v: Tensor, sumsq: Tensor, beta2: float) -> None:
    """v <- b2 v + (1 - b2) * sumsq (a scalar for NAMO, per column for NAMO-D)."""
    saturate_(v.mul_(beta2).add_(sumsq, alpha=1.0 - beta2))


def namo_alpha(base: float | Tensor, n_sumsq: Tensor, v: Tensor, eps: float) -> Tensor:
    """NAMO's adaptive step: alpha = base * ||N||_F / (sqrt(v) + eps)."""
    return base * saturate(n_sumsq).sqrt() / (v.sqrt() + eps)


def namod_raw_scale(n_col_sumsq: Tensor, v_cols: Tensor, eps: float) -> Tensor:
    """NAMO-D's per-column scale before the clamp: d_j = ||N_:,j|| / (sqrt(V_j) + eps)."""
    return saturate(n_col_sumsq).sqrt() / (v_cols.sqrt() + eps)


def namod_clamp(d: Tensor, clamp: float) -> Tensor:
    """Clamp d toward the mean of the unclamped d, to [clamp * mean, mean / clamp], when
    0 < clamp <= 1 and the mean is finite and > 0; otherwise d is left as it is (clamp = 1
    makes every column equal to the mean, clamp = 0 turns the clamp off)."""
    if not 0.0 < clamp <= 1.0:
        return d
    mean = d.mean(dim=-1, keepdim=True)
    clamped = torch.minimum(torch.maximum(d, clamp * mean), mean / clamp)
    usable = torch.isfinite(mean) & (mean > 0)
    return torch.where(usable, clamped, d)


def namo_step_sizes(scale_step: Tensor, shape: float) -> tuple[Tensor, Tensor]:
    """(step_wd, step_up) = (min(s, 1), min(s * shape, 1)) for the adaptive step s (NAMO's
    alpha, or NAMO-D's base * d_j)."""
    return scale_step.clamp(max=1.0), (scale_step * shape).clamp(max=1.0)


def namo_decay_factor(mode: str, lr: float | Tensor, weight_decay: float, step_wd: Tensor) -> float | Tensor:
    """"adaptive": 1 - weight_decay * step_wd, clamped at >= 0 (per column for NAMO-D);
    "lr": 1 - lr * weight_decay, the AdamW/Muon form."""
    if mode == "lr":
        return weight_decay_factor(lr, weight_decay)
    if mode != "adaptive":
        raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {mode!r}")
    return (1.0 - weight_decay * step_wd).clamp(min=0.0)


def namo_factors_(
    v: Tensor,
    grad_col_sumsq: Tensor,
    n_col_sumsq: Tensor,
    step: int,
    lr: float | Tensor,
    *,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale: float,
    d_out: int,
    d_in: int,
    weight_decay_mode: str,
    clamp: float | None,
) -> dict[str, Tensor | float]:
    """Steps 1 and 4-6 of NAMO (``clamp=None``: ``v`` is one scalar per matrix) or NAMO-D
    (``v`` per column) from the column sums of squares of G and of N over all rows: updates
    ``v`` and returns the decay factor and the update step (per matrix, or per column), with
    what diagnostics read. The eager twin of ``trasmuon_kernels.namo``."""
    # Saturated: a sum over columns (or over row shards, all-reduced) may overflow again.
    sumsq = saturate(grad_col_sumsq if clamp is not None else grad_col_sumsq.sum(-1))
    second_moment_update_(v, sumsq, betas[1])
    return namo_factors(v, n_col_sumsq, step, lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        scale=scale, d_out=d_out, d_in=d_in, weight_decay_mode=weight_decay_mode,
                        clamp=clamp)


def namo_factors(
    v: Tensor,
    n_col_sumsq: Tensor,
    step: int,
    lr: float | Tensor,
    *,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale: float,
    d_out: int,
    d_in: int,
    weight_decay_mode: str,
    clamp: float | None,
) -> dict[str, Tensor | float]:
    """Steps 4-6 of ``namo_factors_`` from the updated second moment ``v`` (reads, changes
    nothing)."""
    base = namo_base_step(lr, betas, step)
    shape = namo_shape_factor(scale, d_out, d_in)
    if clamp is None:
        alpha = namo_alpha(base, n_col_sumsq.sum(-1), v, eps)
        out: dict[str, Tensor | float] = {"alpha": alpha}
        scaled = alpha
    else:
        raw = namod_raw_scale(n_col_sumsq, v, eps)
        d = namod_clamp(raw, clamp)
        out = {"d_raw": raw, "d": d}
        scaled = base * d
    step_wd, step_up = namo_step_sizes(scaled, shape)
    out.update(base=base, step_wd=step_wd, step_up=step_up,
               decay=namo_decay_factor(weight_decay_mode, lr, weight_decay, step_wd))
    return out


def namo_update_stage_(
    param: Tensor,
    ortho: Tensor,
    v: Tensor,
    step: int,
    lr: float | Tensor,
    *,
    grad_col_sumsq: Tensor,
    n_col_sumsq: Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale: float,
    weight_decay_mode: str,
    clamp: float | None = None,
    shape: tuple[int, int] | None = None,
    cols: slice | None = None,
) -> dict[str, Tensor | float]:
    """NAMO's (``clamp=None``) or NAMO-D's steps 1 and 4-7 for one matrix given O and the
    column sums of squares of G (before the momentum) and of N, which a sharded matrix
    all-reduces first: ``namo_factors_``, then W <- decay * W - step_up * O (column by column
    for NAMO-D, of the columns ``cols`` that ``param`` and ``ortho`` hold), rounded once."""
    d_out, d_in = shape if shape is not None else tuple(param.shape[-2:])
    out = namo_factors_(v, grad_col_sumsq, n_col_sumsq, step, lr, betas=betas, eps=eps,
                        weight_decay=weight_decay, scale=scale, d_out=d_out, d_in=d_in,
                        weight_decay_mode=weight_decay_mode, clamp=clamp)
    step_up, decay = out["step_up"], out["decay"]
    if cols is not None:  # NAMO-D's per-column factors, on a block of the columns
        step_up, decay = (f[..., cols] if isinstance(f, Tensor) and f.ndim else f for f in (step_up, decay))
    apply_update_(param, widened(ortho, v.dtype, like=param, factor=step_up), decay)
    return out


# --------------------------------------------------------------------------------------
# Kernel-stage compositions (memory passes)
# --------------------------------------------------------------------------------------
# Eager twins of the memory-pass kernels (trasmuon_kernels.momentum_energy, .gate and
# .update): what one launch computes for a stack (B, d_out, d_in), composed from the
# functions above so that the twins cannot drift from the eager step. The gate kernel's
# twin is gate_stage_ itself.


def momentum_energy_pass_(
    momentum: Tensor,
    grad: Tensor,
    beta: float,
    *,
    nesterov: bool,
    energy_source: str | None,
    ns_dtype: torch.dtype = torch.bfloat16,
    rounding: StochasticRounding | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Memory pass 1: ``momentum_stage_`` (momentum updated in place; a bf16 momentum with
    ``rounding``, whose keys and steps are one per matrix of the stack), then returns
    ``(x, energy, x_sqnorm)``: the Newton-Schulz input rounded to ``ns_dtype``; the column
    energies of M or G (``energy_source`` "momentum" or "grad"; None computes none, and
    "update" needs O, see ``update_energy``); and ||x||_F^2 accumulated in the state dtype
    (the square of the norm ``newton_schulz`` divides by). Where that sum overflows, x is
    first scaled by ``overflow_scale``'s power of two, as ``newton_schulz`` does."""
    ns_in, grad_wide, wide = momentum_stage_(grad, {"momentum": momentum}, beta, nesterov, rounding)
    acc = wide.dtype
    x = ns_in.to(ns_dtype).to(acc)
    sumsq = (x * x).sum(dim=-2).sum(dim=-1)
    # The kernel's rare path: where the sum overflowed, X is scaled in place and summed again.
    x = x * overflow_scale(x, sumsq[..., None, None])
    sumsq = (x * x).sum(dim=-2).sum(dim=-1)  # unchanged where the scale is 1
    if energy_source == "momentum":
        energy = column_energy(wide, acc)
    elif energy_source == "grad":
        energy = column_energy(grad_wide, acc)
    elif energy_source is None:
        energy = None
    else:
        raise ValueError(f"energy_source must be 'momentum', 'grad' or None here, got {energy_source!r}")
    return x.to(ns_dtype), energy, sumsq


def update_energy(ortho: Tensor, rowscale: Tensor, acc_dtype: torch.dtype = torch.float32) -> Tensor:
    """``energy_source="update"``: the column energies of O_base = O * rowscale (as
    ``trasmuon_update_stage_`` computes them)."""
    return column_energy(ortho.to(acc_dtype) * rowscale.unsqueeze(-1), acc_dtype)


def row_stats_(
    row_v: Tensor,
    rowsumsq: Tensor,
    d_in: int,
    *,
    beta2: float,
    eps: float,
    scale: float,
    lr: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """Steps 4-6 of docs/rule.md given O's row sums of squares, as ``trasmuon_update_stage_``: updates
    ``row_v`` in place and returns ``(rowscale, eta_hat)``."""
    row_second_moment_update_(row_v, rowsumsq, d_in, beta2)
    rowscale = row_scale(row_v, eps)
    d_out = row_v.shape[-1]
    return rowscale, eta_hat_from_sumsq(scale, lr, d_out, d_in, o_base_sumsq(rowsumsq, rowscale))


def weight_update_pass_(
    param: Tensor,
    ortho: Tensor,
    lr: float | Tensor,
    weight_decay: float,
    *,
    eta_hat: Tensor | None = None,
    rowscale: Tensor | None = None,
    step_size: float | Tensor | None = None,
    col_gate: Tensor | None = None,
) -> None:
    """Memory pass 2: W <- (1 - lr*wd)*W - r_i * c_j * O_ij, rounded once to W's dtype, with
    r = eta_hat * rowscale (``trasmuon_update_stage_``), one ``step_size`` for every row
    (``muon_update_stage_``) or ``step_size * rowscale``; ``col_gate`` None means no gate."""
    acc = state_dtype(param.dtype)
    if step_size is None:
        row_factor = eta_hat.unsqueeze(-1) * rowscale
    else:
        row_factor = torch.as_tensor(step_size, dtype=acc, device=param.device).expand(ortho.shape[-2])
        if rowscale is not None:
            row_factor = row_factor * rowscale
    update = matrix_update(ortho, row_factor, col_gate, acc, like=param)
    apply_update_(param, update, weight_decay_factor(lr, weight_decay))
