"""A Triton driver for machines without a GPU: it compiles for sm_90 and launches nothing.

``install()`` makes it Triton's active driver. ``JITFunction.run`` then specializes the
arguments, looks up and compiles kernels for ``GPUTarget("cuda", 90, 32)`` exactly as on an
H200; with ``launcher=True`` the compiled kernel's final C launcher is replaced by
:class:`NoopLauncher`, so that a whole optimizer step runs through Triton's real dispatch on
CPU tensors (which nothing ever reads). Used by ``bench/compile_report.py`` (compile only) and
``bench/step_launches.py --dispatch triton`` (host time with Triton's dispatch in it).

Run without ``TRITON_INTERPRET``: the kernels must be real ``JITFunction``s.
"""

from __future__ import annotations

import os
from typing import Any


class StandInDriver:
    """What Triton's dispatch asks the active driver: the device, its stream and the
    compile target. Device 0, stream 0."""

    def __init__(self, arch: int = 90) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def __getattr__(self, name: str):
        raise RuntimeError(f"stand-in driver: {name} needs a GPU")


class NoopLauncher:
    """Stands for every compiled kernel's C launcher: counts the calls and, while
    ``recording`` is a list, appends each call's arguments (grid, stream, function, packed
    metadata, hooks, kernel arguments) to it."""

    def __init__(self) -> None:
        self.calls = 0
        self.recording: list[tuple] | None = None

    def __call__(self, *args: Any) -> None:
        self.calls += 1
        if self.recording is not None:
            self.recording.append(args)


LAUNCHER = NoopLauncher()


def install(arch: int = 90, launcher: bool = False) -> NoopLauncher:
    """Make the stand-in driver Triton's active one; with ``launcher``, also give every
    compiled kernel :data:`LAUNCHER` instead of loading its binary. Returns the launcher."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("the stand-in driver needs TRITON_INTERPRET unset (interpreted kernels "
                         "do not compile)")
    import triton
    from triton.compiler.compiler import CompiledKernel

    triton.runtime.driver.set_active(StandInDriver(arch))
    if launcher:
        def init_handles(self: Any) -> None:
            if self.module is not None:
                return
            # No binary to load: a distinct "function handle" per kernel, the shared launcher.
            self.module, self.function = "stand-in", id(self)
            self.n_regs = self.n_spills = None
            self._run = LAUNCHER

        CompiledKernel._init_handles = init_handles
    return LAUNCHER
