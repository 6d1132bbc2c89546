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

A :class:`Launch` whose kernel compiled goes through Triton's dispatch once: its first call
(``kernel[grid](...)``) binds its arguments, specializes and compiles; every later call hands
the same arguments straight to the compiled kernel's launcher, as Triton's own dispatch ends
(``CompiledKernel.run(gx, gy, gz, stream, function, packed_metadata, launch_metadata,
enter_hook, exit_hook, *args)``, the same on Triton 3.6 and 3.9). That skips the binder, the
specialization of every argument and the cache lookup, about three quarters of Triton's host
time per launch. It relies on what a prepared launch already promises: the same tensors (so
the same addresses and alignment) and the same scalars at every call. Triton's own dispatch
runs instead while a launch hook is installed (a profiler's), on another device than the one
bound, or with ``TRASMUON_FAST_LAUNCH=0`` in the environment (or :func:`triton_dispatch`).

:func:`simulate_device` makes CPU tensors stand for a GPU's (``device_props`` answers with the
given props): with a stand-in Triton driver that compiles for sm_90 and launches nothing
(``bench/standin_driver.py``), a whole optimizer step runs through Triton's real dispatch on a
CPU, which is how ``bench/step_launches.py --dispatch triton`` measures host time.

:class:`DeviceProps` holds what the heuristic configs read about a device. Config functions are
pure functions of shapes, dtypes and a ``DeviceProps``, so a test (or the sm_90 compile report)
can ask for the config an H200 would get while running on a CPU.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
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
    "capture_launches",
    "device_props",
    "observe_launches",
    "public_op",
    "record_launches",
    "run_all",
    "simulate_device",
    "stub_launches",
    "stub_torch_launches",
    "triton_dispatch",
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


_simulated: list[DeviceProps] = []


def simulated_props() -> DeviceProps | None:
    """The props CPU tensors stand for inside :func:`simulate_device` (None outside)."""
    return _simulated[-1] if _simulated else None


@contextlib.contextmanager
def simulate_device(props: DeviceProps) -> Iterator[None]:
    """Inside the block, CPU tensors are planned and launched as if they lived on a device
    with ``props`` (its launch configs; the launchers accept them). Only useful with a Triton
    driver that compiles for that device and launches nothing (host-time measurements)."""
    _simulated.append(props)
    try:
        yield
    finally:
        _simulated.pop()


def device_props(device: torch.device | str | DeviceProps) -> DeviceProps:
    """The :class:`DeviceProps` of ``device`` (a ``DeviceProps`` is returned as is)."""
    if isinstance(device, DeviceProps):
        return device
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_props(index)
    return _simulated[-1] if _simulated else INTERPRETER


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
_torch_stubbed = 0
_captured: list[list[Any]] = []  # capture_launches: where launches go instead of running
_slow = 0 if os.environ.get("TRASMUON_FAST_LAUNCH", "1") not in ("0", "") else 1


class _BoundLaunch:
    """A compiled kernel's launcher with one launch's arguments, bound after Triton's dispatch
    compiled it (see the module docstring)."""

    __slots__ = (
        "args",
        "device",
        "function",
        "get_device",
        "get_stream",
        "grid",
        "knobs",
        "packed_metadata",
        "run",
    )

    def __init__(self, kernel: Any, grid: tuple[int, ...], args: tuple, meta: Mapping[str, Any],
                 compiled: Any) -> None:
        import triton
        from triton.runtime.driver import driver

        active = driver.active
        self.get_device, self.get_stream = active.get_current_device, active.get_current_stream
        self.device = self.get_device()
        self.run = compiled.run  # (creates the launcher and loads the binary)
        self.function, self.packed_metadata = compiled.function, compiled.packed_metadata
        self.grid = (*grid, 1, 1)[:3]
        # Every parameter's value in signature order (constexprs and defaults included): what
        # Triton's dispatch passes to the launcher.
        names = set(kernel.signature.parameters)
        bound = kernel.signature.bind(*args, **{k: v for k, v in meta.items() if k in names})
        bound.apply_defaults()
        self.args = tuple(bound.arguments.values())
        self.knobs = triton.knobs.runtime

    def __call__(self) -> bool:
        """Launch; False (nothing launched) when Triton's own dispatch must run instead."""
        knobs = self.knobs
        if _hooked(knobs.launch_enter_hook) or _hooked(knobs.launch_exit_hook):
            return False
        device = self.get_device()
        if device != self.device:
            return False
        gx, gy, gz = self.grid
        self.run(gx, gy, gz, self.get_stream(device), self.function, self.packed_metadata, None,
                 None, None, *self.args)
        return True


def _hooked(hook: Any) -> bool:
    """Whether a launch hook would run: Triton 3.6 and 3.9 keep an (empty) ``HookChain``
    where older versions kept None. With no hook to run, the launch metadata and the hooks
    that Triton's dispatch passes to the launcher are never read: the bound launcher passes
    None for them."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _bindable(kernel: Any, compiled: Any) -> bool:
    """Whether a launch's kernel and what its dispatch returned allow binding: a plain
    ``JITFunction`` (not an autotuner, not the interpreter) that returned a compiled kernel."""
    return (compiled is not None and hasattr(compiled, "packed_metadata")
            and isinstance(getattr(kernel, "signature", None), inspect.Signature)
            and type(kernel).__name__ == "JITFunction")


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
    _bound: list = field(default_factory=list, repr=False)  # [_BoundLaunch] once compiled

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
        if _captured:
            _captured[-1].append(self)
            return
        if _stubbed:
            return
        bound = self._bound
        if bound and not _slow and bound[0]():
            return
        compiled = self.kernel[self.grid](*self.args, **self.meta)
        if not bound and _bindable(self.kernel, compiled):
            if hasattr(compiled, "result"):  # (Triton 3.6's asynchronous compile)
                compiled = compiled.result()
            bound.append(_BoundLaunch(self.kernel, self.grid, self.args, self.meta, compiled))


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
        if _captured:
            _captured[-1].append(self)
        elif not (_stubbed or _torch_stubbed):
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


def public_op(prepare: Callable[..., Prepared], name: str) -> Callable[..., Any]:
    """The public function of an op from its ``prepare_*`` function: the same arguments
    (and signature, for ``help``), issues the launches and returns their ``result``. One
    definition per op: the ``prepare_*`` function holds the checks and the documentation."""

    @functools.wraps(prepare)
    def op(*args: Any, **kwargs: Any) -> Any:
        prepared = prepare(*args, **kwargs)
        run_all(prepared)
        return prepared.result

    op.__name__ = op.__qualname__ = name
    op.__doc__ = (f"Run :func:`{prepare.__name__}`'s launches and return its ``result``.\n\n"
                  + inspect.cleandoc(prepare.__doc__ or ""))
    op.__signature__ = inspect.signature(prepare).replace(  # type: ignore[attr-defined]
        return_annotation=inspect.Signature.empty)
    return op


@contextlib.contextmanager
def observe_launches(observer: Callable[[LaunchRecord], None]) -> Iterator[None]:
    """Call ``observer`` with the :class:`LaunchRecord` of every launch issued inside the
    block, as it is issued (before it runs)."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


@contextlib.contextmanager
def record_launches() -> Iterator[list[LaunchRecord]]:
    """Collect a :class:`LaunchRecord` for every launch issued inside the block."""
    records: list[LaunchRecord] = []
    with observe_launches(records.append):
        yield records


@contextlib.contextmanager
def triton_dispatch() -> Iterator[None]:
    """Every launch inside the block goes through Triton's own dispatch (``kernel[grid]``),
    not the bound launcher (for tests and host-time comparisons)."""
    global _slow
    _slow += 1
    try:
        yield
    finally:
        _slow -= 1


@contextlib.contextmanager
def capture_launches() -> Iterator[list[AnyLaunch]]:
    """Collect every launch issued inside the block, in order, without running it (they are
    still recorded by :func:`record_launches`): a CPU stand-in for a CUDA graph's capture,
    replayed with :func:`run_all`."""
    launches: list[AnyLaunch] = []
    _captured.append(launches)
    try:
        yield launches
    finally:
        _captured.pop()


@contextlib.contextmanager
def stub_torch_launches() -> Iterator[None]:
    """Skip the execution of every :class:`TorchLaunch` inside the block (Triton launches
    still run): on a CPU standing in for a GPU, a torch operation computes synchronously what
    a GPU would queue, which host time must not count."""
    global _torch_stubbed
    _torch_stubbed += 1
    try:
        yield
    finally:
        _torch_stubbed -= 1


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
