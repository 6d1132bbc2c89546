"""Helpers every kernel launcher shares."""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).

    The interpreter computes bfloat16 arithmetic, ``tl.dot`` and ``tl.sum`` on raw bits
    (triton issues 11584, 4972), so kernels take an ``UPCAST_BF16`` constexpr that is set
    from this and upcast bf16 operands to float32 in that case only.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(name: str, tensor: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    if tensor.is_cuda or (tensor.device.type == "cpu" and interpreting()):
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
