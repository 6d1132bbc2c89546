"""``cuda_graph=True``: the optimizer captures its own step in a CUDA graph and replays it.

After the plan is built the Triton step syncs nothing and allocates nothing, and everything it
does on the device is a prepared launch (``trasmuon_kernels._launch``), so one capture holds
the whole step. :class:`StepCapture` decides, at every step, between three things:

* **replay**: the plan, the gradients' addresses and the tensor lrs are those of the capture.
  The host work left is the step's checks (fingerprint, ``check_finite``), writing float lrs
  into the pinned staging buffer and copying it to the device (outside the graph, so a float
  lr changed by a scheduler is read at every replay: float lrs become device slots without
  the user doing anything), and ``graph.replay()``;
* **warm up**: an uncaptured step. The first steps on a new plan compile and bind every
  kernel, and a step whose gradients moved refreshes their address tables; the capture
  happens once ``WARMUP_STEPS`` steps have run on the same plan with the same gradients;
* **capture**: the step is captured (the lr copy stays outside, as above) and the graph is
  replayed once to take the step.

Where a step cannot be captured (an eager bucket, parameters on the CPU or on several
devices, an exchange between ranks) it runs uncaptured with one warning per reason.
Gradients that keep moving (``zero_grad(set_to_none=True)`` with an allocator that does not
hand back the same blocks) make it capture again each time they stop moving; a warning says
so the third time. ``LaunchListGraph`` stands in for a CUDA graph on the CPU (tests): it
records the launches instead of running them and replays them in order.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .plan import StepPlan, local

__all__ = ["WARMUP_STEPS", "CudaStepGraph", "LaunchListGraph", "StepCapture"]

# Uncaptured steps on the same plan and gradients before the capture: the first compiles and
# binds the kernels (and creates the state a rule creates at its first step); the second is a
# steady step, whose launches every later step repeats.
WARMUP_STEPS = 2
MOVED_GRADIENT_WARNING_AT = 3


class CudaStepGraph:
    """A ``torch.cuda.CUDAGraph`` of one step."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        with torch.cuda.graph(self.graph):
            yield

    def replay(self) -> None:
        self.graph.replay()


class LaunchListGraph:
    """A CPU stand-in for :class:`CudaStepGraph`: the launches issued while capturing are
    recorded, not run; ``replay`` issues them in order. What a step does outside prepared
    launches would be missed, exactly as a CUDA graph would miss host work."""

    def __init__(self) -> None:
        self.launches: list[Any] = []
        self.replays = 0

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        from trasmuon_kernels._launch import capture_launches

        with capture_launches() as launches:
            yield
        self.launches = launches

    def replay(self) -> None:
        self.replays += 1
        for launch in self.launches:
            launch()


class StepCapture:
    """The capture of one optimizer's step (see the module docstring)."""

    def __init__(self, owner: str, graph_factory: Any = None) -> None:
        self.owner = owner
        self.graph_factory = graph_factory  # None: CudaStepGraph for CUDA params
        self.graph: Any = None
        self.key: tuple | None = None
        self.seen: tuple | None = None  # the key of the last uncaptured steps
        self.steady = 0  # uncaptured steps in a row with that key
        self.captures = 0
        self.moved = 0
        self.replays = 0
        self._warned: set[str] = set()

    def step(self, opt: Any, plan: StepPlan) -> None:
        reason = self._unsupported(opt, plan)
        if reason is not None:
            self.graph = None
            self._warn(reason, f"{self.owner}: cuda_graph=True, but this step cannot be captured: "
                               f"{reason}; it runs uncaptured")
            opt._run(plan)
            return
        key = self._key(plan)
        if self.graph is not None and key == self.key:
            plan.devices.stage_lrs()
            self.graph.replay()
            self.replays += 1
            return
        if self.graph is not None and key[0] is self.key[0]:
            self.moved += 1  # the same plan, the gradients (or a tensor lr) moved
            if self.moved == MOVED_GRADIENT_WARNING_AT:
                self._warn("moved", f"{self.owner}: cuda_graph=True: the gradients moved to other "
                                    f"addresses {self.moved} times, and each time the step is "
                                    "captured again; keep them in place (zero_grad(set_to_none="
                                    "False)) so that one capture serves every step")
        self.graph = None
        self.steady = self.steady + 1 if key == self.seen else 1
        self.seen = key
        if self.steady <= WARMUP_STEPS:
            opt._run(plan)
            return
        graph = self.graph_factory() if self.graph_factory is not None else CudaStepGraph()
        plan.devices.stage_lrs()
        with graph.capture():
            plan.begin(lrs_staged=True)
            opt._run_stages(plan)
            plan.end()
        graph.replay()  # capturing ran nothing: this is the step
        self.graph, self.key = graph, key
        self.captures += 1

    def _key(self, plan: StepPlan) -> tuple:
        """What a capture depends on beyond the plan: every gradient's address, and which
        tensor is each group's lr (a captured copy reads that tensor)."""
        grads = tuple(local(p.grad).data_ptr() for b in plan.buckets for p in b.params)
        lrs = tuple(id(b.group["lr"]) for b in plan.buckets if isinstance(b.group["lr"], Tensor))
        return (plan, grads, lrs)

    def _unsupported(self, opt: Any, plan: StepPlan) -> str | None:
        eager = [b for b in plan.buckets if b.backend == "eager"]
        if eager:
            return f"{eager[0].labels[0]} runs on the eager backend"
        devices = {b.device for b in plan.buckets}
        if len(devices) > 1:
            return f"the parameters are on {len(devices)} devices"
        if self.graph_factory is None and any(d.type != "cuda" for d in devices):
            return "the parameters are not on a CUDA device"
        if plan.exchanges or plan.sharded_reductions() or opt.process_group is not None:
            return "the step exchanges data between ranks (collectives are not captured here)"
        return None

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=5)
