"""What every kernel module shares: interpreter detection, device checks, bucket arguments
(a 3D stack or a device table of ``data_ptr()``s), launch configs of the memory passes,
float32 rounding of host scalars, output allocation, and the device helpers (pointer of a
bucket's matrix, rounding to a dtype) that several kernels inline.

Launch configs are pure functions of shapes, dtypes and a :class:`~._launch.DeviceProps`
(never of a ``torch.device``), so the config an H200 would get can be computed anywhere."""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import DeviceProps, device_props, simulated_props


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).

    The interpreter computes bfloat16 arithmetic, ``tl.dot`` and ``tl.sum`` on raw bits
    (triton issues 11584, 4972), so kernels take an ``UPCAST_BF16`` constexpr that is set
    from this and upcast bf16 operands to float32 in that case only.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(name: str, tensor: torch.Tensor, props: DeviceProps | None = None) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter.

    A launcher given the props of a GPU also accepts CPU tensors, and so does every launcher
    inside ``simulate_device``: the caller plans launches for another device (the sm_90
    compile report compiles them without running them; the host-time bench dispatches them
    to a launcher that does nothing)."""
    planning = (props is not None and props.is_cuda) or simulated_props() is not None
    if tensor.is_cuda or (tensor.device.type == "cpu" and (interpreting() or planning)):
        return
    raise RuntimeError(
        f"{name} is on {tensor.device}; the Triton kernels need CUDA tensors "
        "(or CPU tensors with TRITON_INTERPRET=1)"
    )


def device_fn(fn):
    """``@triton.jit`` for a device helper on the GPU; the plain function under the interpreter.

    The interpreter re-patches ``triton.language`` on every call of a jit helper (about 5 ms,
    more than the rest of a loop iteration), while a plain function runs the same code in the
    same patched language. Helpers decorated this way use no construct the interpreter's AST
    rewrite handles (chained comparisons, constexpr assignments).
    """
    return fn if interpreting() else triton.jit(fn)


# dtypes the kernels read as gradients/params and write as Newton-Schulz inputs.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------
# Shared launcher helpers
# --------------------------------------------------------------------------------------
def f32(value: float) -> float:
    """``value`` rounded to the nearest float32, as a Python float.

    Kernels take scalars as float32. Every scalar is rounded here, and derived scalars
    (1 - beta, lr*lr, ...) are computed on the host in double, as the eager reference computes
    them, so that the compiled kernel and the interpreter (which keeps Python floats as
    doubles until they meet a tensor) see the same float32 value.
    """
    return struct.unpack("f", struct.pack("f", float(value)))[0]


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def sm_count(props: DeviceProps | torch.device) -> int:
    """SMs of the device (``props.sm_count``); 1 for the interpreter, which runs programs one
    by one, so fewer, larger programs are faster there. A ``torch.device`` is looked up with
    ``device_props`` first."""
    return device_props(props).sm_count


def props_for(tensor: Tensor, props: DeviceProps | None) -> DeviceProps:
    """The props a launcher plans for: ``props`` when given, else those of ``tensor``'s device."""
    return props if props is not None else device_props(tensor.device)


@dataclass(frozen=True)
class PassConfig:
    """Launch config of a tiled memory pass: a BLOCK_R x BLOCK_C tile per loop iteration.

    ``splits`` (row splits per matrix) applies to the column-reducing passes only; None picks
    it from the SM count. No autotuning: defaults come from the shape (``default_config``).
    """

    block_r: int
    block_c: int
    num_warps: int = 4
    splits: int | None = None

    def check(self) -> None:
        for name in ("block_r", "block_c"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"config.{name} must be a power of two >= 1, got {v!r}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"config.num_warps must be a power of two <= 32, got {self.num_warps!r}")
        if self.splits is not None and (not isinstance(self.splits, int) or self.splits < 1):
            raise ValueError(f"config.splits must be None or an int >= 1, got {self.splits!r}")


# Elements per tile: 4096 on a GPU (16 float32 per thread at 8 warps); under the interpreter,
# which pays per Python-level operation rather than per element, larger tiles run faster.
GPU_TILE = 4096
INTERPRETER_TILE = 65536


# Under the interpreter a tile's column sums (tl.sum over rows) are numpy's sequential sums
# along a strided axis: keep the row blocks of column-reducing passes short there so that
# float32 rounding stays near the GPU's tree reduction (see docs/kernels-memory.md).
INTERPRETER_REDUCE_BLOCK_R = 16


def default_config(
    d_out: int,
    d_in: int,
    *,
    props: DeviceProps,
    tile: int | None = None,
    reduces_columns: bool = False,
) -> PassConfig:
    """Tiles of about ``tile`` elements (default ``GPU_TILE`` for a GPU's props,
    ``INTERPRETER_TILE`` for the interpreter's), as wide as the rows allow (up to 256 columns)
    so that every warp reads whole 128-byte lines; 8 warps for a full GPU tile.
    ``reduces_columns``: the pass sums over rows (short row blocks for the interpreter)."""
    on_gpu = props.is_cuda
    if tile is None:
        tile = GPU_TILE if on_gpu else INTERPRETER_TILE
    block_c = min(256, next_pow2(d_in))
    block_r = max(1, min(next_pow2(d_out), tile // block_c))
    if reduces_columns and not on_gpu:
        block_r = min(block_r, INTERPRETER_REDUCE_BLOCK_R)
    num_warps = 8 if block_r * block_c >= GPU_TILE else 4
    return PassConfig(block_r=block_r, block_c=block_c, num_warps=num_warps)


# Largest block of a per-matrix vector (a row of energies, the row statistics of a matrix)
# that one program holds in registers; longer vectors are looped over.
MAX_VECTOR_BLOCK = 4096


def vector_block_config(n: int, props: DeviceProps, block: int | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) of the one-program-per-matrix kernels (gate, k-th smallest, row
    statistics) over vectors of ``n`` float32: ``block`` if given (a power of two), else the
    whole vector up to ``MAX_VECTOR_BLOCK``; at most 8 values per thread (4 warps up to 1024
    values, 8 at 2048, 16 at 4096: the selection kernels hold a 64-bit key per value, and 16
    per thread spilled on sm_90). The same for every device kind: these kernels are
    latency-bound, one program per matrix, and the interpreter's cost does not depend on the
    block either."""
    del props  # no device dependence (yet); part of the signature like every config
    if block is None:
        block = min(MAX_VECTOR_BLOCK, next_pow2(n))
    elif isinstance(block, bool) or not isinstance(block, int) or block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 1, got {block!r}")
    return block, max(4, block // (32 * 8))


def upload_table(table: Tensor, device: torch.device) -> Tensor:
    """A host table (of addresses, counts, ...) on ``device``: as is for the CPU, else copied
    from pinned memory without blocking (no host sync; a pageable copy would synchronize)."""
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    return table


@dataclass(frozen=True, eq=False)
class TensorBucket:
    """B same-shape matrices as one kernel argument.

    Either a 3D stack (``table`` is None; any strides) or a list of separate 2D tensors with one
    shape, dtype, device and strides, passed as a device int64 table of their ``data_ptr()``s
    (``base`` is then the first tensor: it types the kernel's pointers). Build a list bucket once
    with ``TensorBucket.of`` and reuse it while the tensors live (parameters): building the table
    copies B pointers to the device.
    """

    base: Tensor
    table: Tensor | None
    count: int
    shape: tuple[int, int]
    strides: tuple[int, int, int]  # (matrix, row, column) in elements; matrix stride 0 with a table
    aligned: bool  # every matrix starts at a 16-byte aligned address (vectorized loads on GPU)
    tensors: tuple[Tensor, ...] | None = None  # keeps the list alive while the table is used

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def uses_table(self) -> bool:
        return self.table is not None

    @staticmethod
    def of(value: BucketLike, name: str = "tensors", props: DeviceProps | None = None) -> TensorBucket:
        """A bucket from a 3D tensor, a sequence of 2D tensors, or a bucket (returned as is).
        ``props``: as for ``check_device`` (explicit props accept CPU tensors)."""
        if isinstance(value, TensorBucket):
            return value
        if isinstance(value, Tensor):
            if value.ndim != 3:
                raise ValueError(
                    f"{name} must be a 3D stack (B, d_out, d_in) or a list of 2D tensors, got a "
                    f"tensor of shape {tuple(value.shape)}"
                )
            check_device(name, value, props)
            b, d_out, d_in = value.shape
            return TensorBucket(
                base=value,
                table=None,
                count=b,
                shape=(d_out, d_in),
                strides=tuple(value.stride()),
                aligned=value.data_ptr() % 16 == 0,
            )
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            tensors = tuple(value)
            if not tensors:
                raise ValueError(f"{name} is an empty list; a bucket needs at least one matrix")
            first = tensors[0]
            for i, t in enumerate(tensors):
                if not isinstance(t, Tensor):
                    raise TypeError(f"{name}[{i}] is a {type(t).__name__}, not a tensor")
                if t.ndim != 2:
                    raise ValueError(f"{name}[{i}] must be 2D, got shape {tuple(t.shape)}")
                if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                    raise ValueError(
                        f"{name}[{i}] is {tuple(t.shape)} {t.dtype} on {t.device}, but {name}[0] "
                        f"is {tuple(first.shape)} {first.dtype} on {first.device}: a bucket holds "
                        "one shape, dtype and device"
                    )
                if t.stride() != first.stride():
                    raise ValueError(
                        f"{name}[{i}] has strides {t.stride()}, but {name}[0] has "
                        f"{first.stride()}: a pointer-table bucket shares one layout"
                    )
            check_device(name, first, props)
            ptrs = [t.data_ptr() for t in tensors]
            table = upload_table(torch.tensor(ptrs, dtype=torch.int64), first.device)
            d_out, d_in = first.shape
            return TensorBucket(
                base=first,
                table=table,
                count=len(tensors),
                shape=(d_out, d_in),
                strides=(0, *first.stride()),
                aligned=all(p % 16 == 0 for p in ptrs),
                tensors=tensors,
            )
        raise TypeError(
            f"{name} must be a 3D tensor, a list of 2D tensors or a TensorBucket, "
            f"got {type(value).__name__}"
        )


BucketLike = Tensor | Sequence[Tensor] | TensorBucket


def check_dtype(name: str, tensor: Tensor, allowed: Sequence[torch.dtype]) -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected one of {names}")


def check_shape(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(shape)}")


def check_stack(name: str, value: Tensor, props: DeviceProps | None) -> None:
    """``value`` is a 3D stack (B, d_out, d_in) of a float dtype on a device the kernels run on
    (``props``: as for ``check_device``)."""
    if not isinstance(value, Tensor) or value.ndim != 3:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a 3D stack (B, d_out, d_in), got {shape}")
    check_device(name, value, props)
    check_dtype(name, value, FLOAT_DTYPES)


def check_same_device(name: str, tensor: Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, but the bucket is on {device}")


def check_no_overlap(name: str, tensor: Tensor) -> None:
    """Written-in-place tensors must not be expanded views (two elements, one address)."""
    if any(s == 0 and n > 1 for s, n in zip(tensor.stride(), tensor.shape, strict=True)):
        raise ValueError(f"{name} is an expanded view (stride 0); it is written in place")


def out_or_new(
    name: str, out: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``out`` checked against the expected shape/dtype/device, or a new empty tensor."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(out).__name__}")
    check_shape(name, out, shape)
    if out.dtype != dtype:
        raise TypeError(f"{name} has dtype {out.dtype}; expected {dtype}")
    check_same_device(name, out, device)
    check_no_overlap(name, out)
    return out


def workspace_or_new(name: str, buf: Tensor | None, need: int, device: torch.device) -> Tensor:
    """The first ``need`` elements of ``buf``, a preallocated contiguous float32 buffer of at
    least ``need`` elements on ``device`` (checked), or a new buffer of exactly ``need``.
    Partial sums of the two-stage reductions live there, so that a prepared launch list
    replays without allocating."""
    if buf is None:
        return torch.empty(need, dtype=torch.float32, device=device)
    if not isinstance(buf, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(buf).__name__}")
    if buf.dtype != torch.float32 or not buf.is_contiguous() or buf.numel() < need:
        raise ValueError(
            f"{name} must be a contiguous float32 buffer of >= {need} elements, got "
            f"{buf.dtype} with {buf.numel()} elements"
        )
    check_same_device(name, buf, device)
    return buf.view(-1)[:need]


def scalar_or_tensor(name: str, value: float | Tensor, device: torch.device) -> tuple[Tensor | None, float]:
    """A float scalar (rounded to float32) or a one-element float tensor on the bucket's device,
    read by the kernel (no host sync). Returns (tensor or None, float value or 0.0)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} tensor must be floating point, got {value.dtype}")
        check_same_device(name, value, device)
        return value.reshape(()), 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a one-element tensor, got {type(value).__name__}")
    return None, f32(value)


# --------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------
# The largest finite float32 (torch.finfo(torch.float32).max; exact as a float32 literal).
FLT32_MAX: tl.constexpr = tl.constexpr(torch.finfo(torch.float32).max)


@device_fn
def saturate(x):
    """min(x, FLT32_MAX) for a sum of squares (finite or +inf, never NaN): the kernels' twin
    of ``reference.saturate``, free in a memory-bound pass, no finite value changes."""
    return tl.minimum(x, FLT32_MAX)


@device_fn
def matrix_base(base, table, b, stride_b, USE_TABLE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to matrix ``b`` of a bucket: ``base + b*stride_b`` (int64) for a stack, or the
    ``b``-th entry of a device table of addresses cast to ``base``'s pointer type."""
    if USE_TABLE:
        ptr = tl.load(table + b).to(tl.pointer_type(base.dtype.element_ty))
        if ALIGNED:
            # The cast loses alignment facts; restore them so GPU loads stay vectorized.
            ptr = tl.multiple_of(ptr, 16)
    else:
        ptr = base + b.to(tl.int64) * stride_b
    return ptr


@device_fn
def one_minus_pow(log_b, t):
    """1 - b^t in float32 from ln(b) (rounded on the host) and t >= 1 (bias corrections).

    1 - b^t = -expm1(t*ln b). For |t ln b| <= 0.5 it comes from expm1's Taylor series (terms past
    x^9/9! are below float32 rounding there): 1 - exp() would cancel when b^t is close to 1 (at
    t = 1 and b2 = 0.999 it would lose 10 bits). Further out 1 - exp(x) >= 0.39 does not cancel.
    b = 0 (ln b = -inf) gives 1."""
    x = t * log_b
    xs = tl.maximum(x, -0.5)  # keeps the unused series finite
    s = 1.0 + xs * (1.0 / 9.0)
    s = 1.0 + xs * (1.0 / 8.0) * s
    s = 1.0 + xs * (1.0 / 7.0) * s
    s = 1.0 + xs * (1.0 / 6.0) * s
    s = 1.0 + xs * (1.0 / 5.0) * s
    s = 1.0 + xs * (1.0 / 4.0) * s
    s = 1.0 + xs * (1.0 / 3.0) * s
    s = 1.0 + xs * 0.5 * s
    return tl.where(x > -0.5, -(xs * s), 1.0 - tl.exp(x))


def log_beta(beta: float) -> float:
    """ln(beta) rounded to float32 for ``one_minus_pow`` (-inf for beta = 0)."""
    return f32(math.log(beta)) if beta > 0 else -math.inf


@device_fn
def round_to(x, DTYPE: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr):
    """Round float32 ``x`` once to ``DTYPE`` (round to nearest even, as torch's ``.to``).

    The interpreter truncates float32 -> bfloat16 instead of rounding (its RTNE mode is not
    ties-to-even either), so under it the rounding is done on the bits, as c10::BFloat16 does.
    The GPU path is the native conversion (cvt.rn.bf16.f32).
    """
    if DTYPE == tl.bfloat16:
        if EMULATE_BF16_RNE:
            bits = x.to(tl.int32, bitcast=True)
            rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            rounded = tl.where(x != x, 0x7FC0, rounded)
            out = rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            out = x.to(tl.bfloat16)
    else:
        out = x.to(DTYPE)
    return out


# --------------------------------------------------------------------------------------
# Stochastic rounding to bf16 (a matrix rule's momentum with state_dtype=torch.bfloat16)
# --------------------------------------------------------------------------------------
@device_fn
def fmix32(h):
    """MurmurHash3's 32-bit finalizer on uint32 (wrapping multiplies): the twin of
    ``trasmuon.reference.fmix32``, which does the same in int64 with masks."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    h = h ^ (h >> 16)
    return h


@device_fn
def sr_stream(key, step):
    """A matrix's 32-bit stream at step t (uint32 key, float32 or integer t):
    fmix32(key ^ fmix32(t)), as ``reference.sr_stream``."""
    return fmix32(key ^ fmix32(step.to(tl.uint32)))


@device_fn
def stochastic_round_bf16(x, r):
    """float32 ``x`` rounded to bf16 stochastically with the uint32 random ``r``: the top 16
    bits of r are added below bf16's mantissa and the result is truncated; a finite x
    saturates at +-bf16 max instead of becoming inf, NaN becomes 0x7FC0. The twin of
    ``reference.stochastic_round_bf16`` (the same integer operations)."""
    bits = x.to(tl.uint32, bitcast=True)
    out = (bits + (r >> 16)) >> 16
    magnitude = bits & 0x7FFFFFFF
    out = tl.where((magnitude < 0x7F800000) & ((out & 0x7FFF) == 0x7F80), (out & 0x8000) | 0x7F7F, out)
    out = tl.where(magnitude > 0x7F800000, 0x7FC0, out)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)
