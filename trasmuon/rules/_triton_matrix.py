"""The Triton programs of the matrix rules (placeholder while the kernels are refactored)."""

from __future__ import annotations

from typing import Any


def unsupported_reason(group: Any, param: Any, grad: Any) -> str | None:
    return "the Triton matrix programs are being rebuilt"
