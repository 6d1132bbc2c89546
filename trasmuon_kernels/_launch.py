"""Prepared launches and the device facts that launch configs depend on.

A :class:`Launch` is one kernel launch with every argument already computed: the kernel, its
grid, its positional arguments and its constexprs/launch options. Launchers split into a
``prepare_*`` function (input checks, config, output allocation, argument list) that returns
launches (a :class:`Prepared` list, whose ``result`` is what the public function returns), and
the public function that prepares and runs them. A caller that launches the same
work every step (the optimizer's step plan) prepares once and replays the list: no argument is
recomputed, and two replays issue the same launches with the same arguments.

:class:`TorchLaunch` is a device operation that is not one of our Triton kernels (a torch
reduction over partial sums, a copy), kept in the same list so that launch counts and recorded
launch lists cover everything a step issues.

:func:`record_launches` observes launches (for launch counts and the "same launches every step"
test); :func:`stub_launches` skips their execution (for host-time measurements).

:class:`DeviceProps` holds what the heuristic configs read about a device. Config functions are
pure functions of shapes, dtypes and a ``DeviceProps``, so a test (or the sm_90 compile report)
can ask for the config an H200 would get while running on a CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch

__all__ = [
    "H200",
    "INTERPRETER",
    "DeviceProps",
    "Launch",
    "LaunchRecord",
    "Prepared",
    "TorchLaunch",
    "device_props",
    "record_launches",
    "run_all",
    "stub_launches",
]


# --------------------------------------------------------------------------------------
# Device facts
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceProps:
    """What launch heuristics may depend on. ``kind`` is ``"cuda"`` for a GPU and ``"cpu"``
    for Triton's interpreter (which runs programs one by one: fewer, larger programs are
    faster there)."""

    kind: str
    sm_count: int = 1
    capability: tuple[int, int] | None = None

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"


# The GPU the project's device checks run on (132 SMs, sm_90).
H200 = DeviceProps(kind="cuda", sm_count=132, capability=(9, 0))
INTERPRETER = DeviceProps(kind="cpu", sm_count=1, capability=None)


@cache
def _cuda_props(index: int) -> DeviceProps:
    p = torch.cuda.get_device_properties(index)
    return DeviceProps(kind="cuda", sm_count=p.multi_processor_count, capability=(p.major, p.minor))


def device_props(device: torch.device | str | DeviceProps) -> DeviceProps:
    """The :class:`DeviceProps` of ``device`` (a ``DeviceProps`` is returned as is)."""
    if isinstance(device, DeviceProps):
        return device
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_props(index)
    return INTERPRETER


# --------------------------------------------------------------------------------------
# Launches
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchRecord:
    """What a launch was, for comparisons: the kernel's name, the grid, and each argument as
    ``("tensor", data_ptr, dtype, shape)`` or ``("value", v)``; constexprs as given."""

    name: str
    grid: tuple[int, ...]
    args: tuple[tuple, ...]
    meta: tuple[tuple[str, Any], ...]


def _describe(value: Any) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("tensor", value.data_ptr(), str(value.dtype), tuple(value.shape))
    return ("value", value)


_observers: list[Callable[[LaunchRecord], None]] = []
_stubbed = 0


@dataclass(frozen=True, eq=False)
class Launch:
    """One Triton kernel launch with fixed arguments; calling it launches the kernel.
    ``keepalive``: objects the arguments point into without holding them (the tensors behind
    a device table of pointers), kept alive as long as the launch."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    keepalive: tuple[Any, ...] = ()

    @property
    def kernel_name(self) -> str:
        if self.name:
            return self.name
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", type(self.kernel).__name__)

    def record(self) -> LaunchRecord:
        return LaunchRecord(
            name=self.kernel_name,
            grid=tuple(self.grid),
            args=tuple(_describe(a) for a in self.args),
            meta=tuple(sorted((k, v) for k, v in self.meta.items())),
        )

    def __call__(self) -> None:
        if _observers:
            rec = self.record()
            for observe in _observers:
                observe(rec)
        if not _stubbed:
            self.kernel[self.grid](*self.args, **self.meta)


@dataclass(frozen=True, eq=False)
class TorchLaunch:
    """A device operation issued through torch (a reduction over partials, a copy); ``tensors``
    are the tensors it reads and writes (recorded by address)."""

    name: str
    fn: Callable[[], Any]
    tensors: tuple[torch.Tensor, ...] = ()

    def record(self) -> LaunchRecord:
        return LaunchRecord(
            name=f"torch:{self.name}", grid=(), args=tuple(_describe(t) for t in self.tensors), meta=()
        )

    def __call__(self) -> None:
        if _observers:
            rec = self.record()
            for observe in _observers:
                observe(rec)
        if not _stubbed:
            self.fn()


AnyLaunch = Launch | TorchLaunch


class Prepared(list):
    """What a ``prepare_*`` function returns: its launches, in order (this is a plain list of
    :class:`Launch` and :class:`TorchLaunch`), and ``result``, what the op's public function
    returns (its output tensors, allocated by the prepare call when they were not given)."""

    def __init__(self, launches: Iterable[AnyLaunch] = (), result: Any = None) -> None:
        super().__init__(launches)
        self.result = result


def run_all(launches: Iterable[AnyLaunch]) -> None:
    """Issue ``launches`` in order."""
    for launch in launches:
        launch()


@contextlib.contextmanager
def record_launches() -> Iterator[list[LaunchRecord]]:
    """Collect a :class:`LaunchRecord` for every launch issued inside the block."""
    records: list[LaunchRecord] = []
    _observers.append(records.append)
    try:
        yield records
    finally:
        _observers.remove(records.append)


@contextlib.contextmanager
def stub_launches() -> Iterator[None]:
    """Skip the execution of every launch issued inside the block (they are still recorded
    by :func:`record_launches`): what is left is the host work of preparing and issuing them."""
    global _stubbed
    _stubbed += 1
    try:
        yield
    finally:
        _stubbed -= 1
