"""Value checks for hyperparameters: small predicates, each paired with the words an error
message uses for a valid value."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

from .. import reference as ref

Check = Callable[[object], bool]


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Check:
    def check(v: object) -> bool:
        if not is_real(v):
            return False
        above = v > lo if lo_open else v >= lo
        below = v < hi if hi_open else v <= hi
        return above and below

    return check


def is_bool(v: object) -> bool:
    return isinstance(v, bool)


def int_at_least(lo: int) -> Check:
    return lambda v: is_int(v) and v >= lo


def one_of(values: tuple) -> Check:
    return lambda v: any(v is x or v == x for x in values)


def valid_betas(v: object) -> bool:
    return (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(in_range(0.0, 1.0, hi_open=True)(b) for b in v)
    )


def valid_ns_coefficients(v: object) -> bool:
    if ref.is_ns_triple(v):
        return all(math.isfinite(x) for x in v)
    return (
        isinstance(v, (tuple, list))
        and len(v) > 0
        and all(ref.is_ns_triple(t) and all(math.isfinite(x) for x in t) for t in v)
    )


def valid_ns_restarts(v: object) -> bool:
    """A tuple or list of distinct ints >= 1 (empty: no restart)."""
    return (
        isinstance(v, (tuple, list))
        and all(is_int(r) and r >= 1 for r in v)
        and len(set(v)) == len(v)
    )


def valid_ns_blocks(v: object) -> bool:
    """A pair (row_blocks, col_blocks) of ints >= 1 (a tuple or a list)."""
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(is_int(b) and b >= 1 for b in v)


def valid_lr(v: object) -> bool:
    """A finite float >= 0, or a one-element floating tensor (its value is checked by
    ``tensor_lr_problem`` when the optimizer first sees that tensor, not at every step:
    reading a CUDA tensor would sync the host)."""
    if isinstance(v, Tensor):
        return v.numel() == 1 and v.is_floating_point()
    return in_range(0.0, math.inf)(v)


def tensor_lr_problem(v: Tensor) -> str | None:
    """What is wrong with a tensor lr (None when nothing is). Reads its value, a host sync
    on CUDA: the optimizer calls it once per lr tensor it binds, not at every step."""
    if v.numel() != 1:
        return f"a tensor lr must have one element, got shape {tuple(v.shape)}"
    if not v.is_floating_point():
        return f"a tensor lr must be floating point, got dtype {v.dtype}"
    if v.device.type == "meta":
        return "a tensor lr on the meta device has no value; create it on the parameters' device"
    value = float(v.detach().reshape(()).cpu())
    if not (math.isfinite(value) and value >= 0.0):
        return f"a tensor lr must be finite and >= 0, got {value}"
    return None
